"""Loading a pretrained causal LM for evaluation, in one of three layouts (`model_kwargs.sharding`):

  none        the whole model on this process's device
  device_map  Accelerate's big-model dispatch (transformers' `device_map`): layers spread over the local GPUs, CPU
              and, past `max_memory` per device, disk (`offload_folder`); the output embedding and final norm stay
              on a real device, since scoring reads the output embedding directly
  fsdp        several processes (`accelerate launch`, one or several nodes), each holding 1/world of the weights:
              the model is built on the meta device, every decoder layer and the root are sharded with FSDP2
              (`fully_shard`), and each rank reads only its slices of the safetensors files
              (torch.distributed.checkpoint's HuggingFaceStorageReader): no process ever holds the whole model.
              Ranks split the eval batches (data parallel); every rank takes part in every forward.

Why FSDP2 for the multi-process mode, measured on CPU only (bench/bench_llm.py --part layouts, docs/BENCHMARKS.md):
on 2 gloo processes FSDP2, transformers' tensor-parallel plan (tp_plan="auto") and DeepSpeed ZeRO-3 inference all
score as the whole model and hold half the weights per rank; FSDP2 and tensor parallelism ran within noise of each
other (0.65-0.81x and 0.59-0.82x the speed of whole replicas), ZeRO-3 slowest (0.52-0.53x) with the highest peak
memory and loading time. None was clearly better, so FSDP2 stays: it needs nothing beyond torch and transformers,
each rank reads only its slices of the shards, it spans nodes with plain data-parallel batches, and it is tested
here. GPU throughput was not measured (no GPU was lent); within an NVLink node tensor parallelism may win on latency.
Never runs remote code unless `model_kwargs.trust_remote_code=true`.
"""
from __future__ import annotations

import torch

from normscale.config import Config, NormscaleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_llm(config: Config, accelerator):
    """(model, tokenizer) for config.model_kwargs, laid out as `sharding` says; the model in eval mode."""
    from transformers import AutoTokenizer

    kwargs = config.model_kwargs
    if not kwargs.model_path:
        raise NormscaleError("model=llm needs model_kwargs.model_path=<local directory or hub id>")
    if kwargs.sharding != "fsdp" and accelerator.num_processes > 1:
        raise NormscaleError(f"model_kwargs.sharding={kwargs.sharding} runs in one process, but {accelerator.num_processes} "
                             "were launched: use model_kwargs.sharding=fsdp under accelerate launch")
    try:  # the first read of the model: a hub id that does not exist, a directory without a tokenizer
        tokenizer = AutoTokenizer.from_pretrained(kwargs.model_path, trust_remote_code=kwargs.trust_remote_code)
    except OSError as error:  # transformers' message: several lines, the first names the problem
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise NormscaleError(f"cannot load the tokenizer of model_kwargs.model_path={kwargs.model_path}: "
                             f"{first}") from None
    load = {"none": _load_whole, "device_map": _load_dispatched, "fsdp": _load_sharded}[kwargs.sharding]
    model = load(config, accelerator)
    return model.eval(), tokenizer


def _load_whole(config: Config, accelerator):
    from transformers import AutoModelForCausalLM

    kwargs = config.model_kwargs
    model = AutoModelForCausalLM.from_pretrained(kwargs.model_path, dtype=DTYPES[kwargs.dtype],
                                                 trust_remote_code=kwargs.trust_remote_code)
    return model.to(accelerator.device)


def _load_dispatched(config: Config, accelerator):
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = config.model_kwargs
    dtype = DTYPES[kwargs.dtype]
    model_config = AutoConfig.from_pretrained(kwargs.model_path, trust_remote_code=kwargs.trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=kwargs.trust_remote_code)
    devices = [*range(torch.cuda.device_count()), "cpu"]
    max_memory = None if kwargs.max_memory is None else {d: kwargs.max_memory for d in devices}
    device_map = infer_auto_device_map(empty, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=empty._no_split_modules)
    for name in _pinned_modules(empty):  # read directly by the scorer, or buffers not in the checkpoint: never offloaded
        _pin(device_map, empty, name, devices[0])
    if "disk" in device_map.values() and not kwargs.offload_folder:
        raise NormscaleError(f"the model does not fit in model_kwargs.max_memory={kwargs.max_memory} per device; "
                             "set model_kwargs.offload_folder=<dir> to offload the rest to disk, or raise the budget")
    model = AutoModelForCausalLM.from_pretrained(kwargs.model_path, dtype=dtype, device_map=device_map,
                                                 offload_folder=kwargs.offload_folder,
                                                 trust_remote_code=kwargs.trust_remote_code)
    placed = getattr(model, "hf_device_map", device_map)  # a map onto one device sets no hf_device_map
    accelerator.print(f"normscale: device_map {sorted(set(map(str, placed.values())))} "
                      f"({sum(v == 'disk' for v in placed.values())} module(s) on disk)")
    return model


def _pinned_modules(model) -> list[str]:
    """The output embedding, the final norm and the rotary embedding (its inv_freq is computed, not loaded)."""
    names = {id(m): n for n, m in model.named_modules()}
    base = getattr(model, "model", None)
    extra = [getattr(base, name, None) for name in ("norm", "rotary_emb")]
    return [names[id(model.get_output_embeddings())]] + [names[id(m)] for m in extra if m is not None]


def _pin(device_map: dict, model, name: str, device) -> None:
    """Place module `name` on `device`, splitting a device_map entry that covers it into its children first."""
    while name not in device_map:
        parent = max((k for k in device_map if k == "" or name.startswith(k + ".")), key=len)
        placed = device_map.pop(parent)
        for child, _ in (model.get_submodule(parent) if parent else model).named_children():
            device_map[f"{parent}.{child}" if parent else child] = placed
    device_map[name] = device


def _load_sharded(config: Config, accelerator):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = config.model_kwargs
    if accelerator.num_processes < 2:
        raise NormscaleError("model_kwargs.sharding=fsdp shards the weights over several processes: launch with "
                             "accelerate launch --num_processes N (on CPU: launch/cpu.sh N)")
    model_config = AutoConfig.from_pretrained(kwargs.model_path, trust_remote_code=kwargs.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=DTYPES[kwargs.dtype],
                                                 trust_remote_code=kwargs.trust_remote_code)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)  # FSDP2 keeps a root unsharded after forward (for a backward)
    model.to_empty(device=accelerator.device)
    rotary = model.model.rotary_emb  # its inv_freq buffer is not in the checkpoint: rebuild it for real
    with torch.device(accelerator.device):
        model.model.rotary_emb = type(rotary)(config=model_config)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(kwargs.model_path))
    return model


def parameter_bytes(model) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model) over the parameters."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        total += p.numel() * p.element_size()
    return local, total
