"""Accelerate glue: the Accelerator for this launch, collective checkpoint and resume saves, and a clean exit.

DDP, FSDP or DeepSpeed is chosen by the accelerate config the job was launched with (launch/*.yaml); nothing in
the training loop depends on which: their specifics (the DeepSpeed config filled from the training config, FSDP's
block classes, gathering full weights for checkpoints) live here. Without CUDA the process group is gloo.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from normscale.checkpoints import choose_resume, publish_resume, resume_record, write_checkpoint
from normscale.config import Config, ConfigError, FaultError, NormscaleError, RunRefusedError
from normscale.dist import process_info
from normscale.fileio import disk_full_guard
from normscale.layout import resume_state_dir

PRECISION = {"fp32": "no", "bf16": "bf16"}
# glibc malloc parameters, name: (mallopt option, normscale's value); the environment variable is MALLOC_<name>_.
# Blocks up to 32 MiB come from the heap, which keeps up to 1 GiB free for reuse.
MALLOC_SETTINGS = {"MMAP_THRESHOLD": (-3, 32 << 20), "TRIM_THRESHOLD": (-1, 1 << 30), "TOP_PAD": (-2, 64 << 20)}


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse (nothing to do under other C libraries). By default it hands
    large freed blocks back to the OS, so every step faults its activations in again, page by page: thousands of
    page faults a step for the canonical model on CPU (bench/bench_train.py). Any process gets the same from the
    environment variables MALLOC_<name>_=<value> of MALLOC_SETTINGS."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    for name, (option, value) in MALLOC_SETTINGS.items():
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"glibc's mallopt(M_{name}, {value}) failed")


def make_accelerator(config: Config) -> Accelerator:
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # save_state's per-file INFO lines drown the progress
    training = config.training_kwargs
    several_on_cpu = process_info().world_size > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if several_on_cpu else []
    if several_on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        import deepspeed

        # DeepSpeed's CPU backend otherwise JIT-compiles its shared-memory allreduce (~23 s, every run); gloo suffices
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    accelerator = Accelerator(mixed_precision=PRECISION[training.precision],
                              gradient_accumulation_steps=training.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise NormscaleError(f"{accelerator.num_processes} processes but accelerate set up no data parallelism "
                             "(accelerate's FSDP needs GPUs): on CPU use launch/cpu.sh N (DDP) or launch/zero3.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, config, accelerator.num_processes)
    warn_if_cpu_launch_collapsed(accelerator)
    return accelerator


def configure_deepspeed(ds_config: dict, config: Config, num_processes: int) -> None:
    """Fill the DeepSpeed config from normscale's settings, so the launch file cannot contradict them: clipping,
    accumulation, the per-process micro batch (no dataloader tells Accelerate), and full weights gathered for
    checkpoints under ZeRO-3 (in the training dtype, despite the '16bit' in DeepSpeed's name)."""
    training = config.training_kwargs
    micro = training.batch_size // (num_processes * training.gradient_accumulation_steps)
    ds_config.update(gradient_clipping=training.max_grad_norm,
                     gradient_accumulation_steps=training.gradient_accumulation_steps,
                     train_micro_batch_size_per_gpu=micro,
                     train_batch_size=micro * num_processes * training.gradient_accumulation_steps)
    ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def warn_if_cpu_launch_collapsed(accelerator: Accelerator, environ=os.environ) -> bool:
    """`accelerate launch --cpu --num_processes N` silently starts one process (INFRA.md): say so."""
    collapsed = (accelerator.num_processes == 1 and environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
                 and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ)
    if collapsed:
        warnings.warn("accelerate launch --cpu started a single process (it fans out on CPU only through MPI). "
                      "For N CPU processes use `launch/cpu.sh N -m normscale.train ...` "
                      "(ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...).", stacklevel=2)
    return collapsed


def uses_sharded_parameters(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def prepare(accelerator: Accelerator, model, optimizer, scheduler):
    """accelerator.prepare, with FSDP wrapping only the block classes this model has (launch/fsdp.yaml names those
    of every normscale model; accelerate rejects a name the model lacks); then each rank reports its share."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is not None and plugin.transformer_cls_names_to_wrap:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in plugin.transformer_cls_names_to_wrap if n in present]
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    report_sharding(accelerator, model)
    return model, optimizer, scheduler


def parameter_elements(model) -> tuple[int, int]:
    """(elements of the parameters this rank holds, elements of the whole model): smaller under ZeRO-3 / FSDP."""
    from torch.distributed.tensor import DTensor  # here: importing it costs every process seconds (sympy)

    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: an empty placeholder; this rank's partition is ds_tensor
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        elif isinstance(p, DTensor):  # FSDP2
            local, full = local + p.to_local().numel(), full + p.numel()
        else:
            local, full = local + p.numel(), full + p.numel()
    return local, full


def report_sharding(accelerator: Accelerator, model) -> None:
    """One line per rank of a multi-process run: how many parameter elements it holds of the model's total."""
    if accelerator.num_processes == 1:
        return
    local, full = parameter_elements(model)
    sharded = "sharded" if local < full else "replicated"
    print(f"normscale: rank {accelerator.process_index}: parameters {sharded}, local {local} of {full} elements",
          flush=True)


def save_checkpoint(accelerator: Accelerator, model, run_dir: Path, step: int, meta: dict) -> None:
    """Consolidated weights of `model` into checkpoint-<step>/. Collective: every rank must call it (gathering
    FSDP / ZeRO-3 shards); the main process writes."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        write_checkpoint(run_dir, step, state_dict, meta)
    accelerator.wait_for_everyone()


def accumulators_file(rank: int) -> str:
    return f"accumulators-{rank}.safetensors"


def stage_resume(accelerator: Accelerator, run_dir: Path, step: int, accumulators: dict[str, torch.Tensor]) -> None:
    """Write the resume state at `step` into its staging directory, not yet complete: model, optimizer, scheduler,
    RNG (sharded as the run is), and each rank's metric accumulators, so a resumed run logs exactly what an
    uninterrupted one would. Collective."""
    staging = resume_state_dir(run_dir, step)
    if accelerator.is_main_process and staging.exists():  # left by a save that did not finish
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    with disk_full_guard(staging, "the previous resume state and every checkpoint"):
        accelerator.save_state(str(staging))
        save_file({k: v.detach().cpu().contiguous() for k, v in accumulators.items()},
                  staging / accumulators_file(accelerator.process_index))
    accelerator.wait_for_everyone()


def resume_info(accelerator: Accelerator, info: dict) -> dict:
    """What a resume state records besides its files: `info` and the launch it was saved by."""
    return {**info, "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type)}


def save_resume(accelerator: Accelerator, run_dir: Path, step: int, accumulators: dict[str, torch.Tensor],
                info: dict) -> None:
    """The rolling resume state at `step`: every rank writes its part (stage_resume), then the main process records
    their hashes and publishes it atomically. Collective."""
    stage_resume(accelerator, run_dir, step, accumulators)
    if accelerator.is_main_process:
        publish_resume(run_dir, step, resume_record(run_dir, step, resume_info(accelerator, info)))
    accelerator.wait_for_everyone()


def load_resume(accelerator: Accelerator, run_dir: Path, identity: str
                ) -> tuple[int, dict[str, torch.Tensor] | None, dict | None]:
    """Restore the newest intact resume state (damaged newer ones are named and deleted by the main process), after
    checking that it was saved by a run of this `identity` and by the same world size and distributed type:
    (step to continue from, this rank's metric accumulators, the state's record); (0, None, None) when none."""
    chosen = None
    if accelerator.is_main_process:
        state, record, notes = choose_resume(run_dir)
        for note in notes:
            print(f"normscale: {note}", flush=True)
        chosen = None if state is None else (state.name, record)
    chosen = broadcast_from_main(accelerator, chosen)
    if chosen is None:
        return 0, None, None
    name, record = chosen
    if record.get("identity_hash", identity) != identity:
        raise RunRefusedError(f"the resume state of {run_dir} was saved by a run of another identity "
                              f"({record['identity_hash']}, this config is {identity}); overwrite=true replaces it, or "
                              "choose another name=")
    saved = (record.get("world_size", accelerator.num_processes),
             record.get("distributed_type", str(accelerator.distributed_type)))
    if saved != (accelerator.num_processes, str(accelerator.distributed_type)):
        raise ConfigError(f"the resume state of {run_dir} was saved by {saved[0]} process(es) ({saved[1]}); this "
                          f"launch has {accelerator.num_processes} ({accelerator.distributed_type}): launch it as it "
                          "was saved, or start over with overwrite=true")
    state = Path(run_dir) / name
    accelerator.load_state(str(state))
    accumulators = state / accumulators_file(accelerator.process_index)
    return record["step"], load_file(accumulators) if accumulators.exists() else None, record


def check_replicas_identical(accelerator: Accelerator, model) -> None:
    """Data parallelism keeps a full copy of the parameters on every rank: check that all copies agree, bit for
    bit (a collective; call it on every rank). Sharded runs (FSDP, DeepSpeed) have no copies to compare."""
    if accelerator.num_processes == 1 or uses_sharded_parameters(accelerator):
        return
    flat = torch.cat([p.detach().flatten().float().cpu() for p in accelerator.unwrap_model(model).parameters()])
    digest = int.from_bytes(hashlib.sha256(flat.numpy().tobytes()).digest()[:8], "little", signed=True)
    digests = accelerator.gather(torch.tensor([digest], device=accelerator.device)).tolist()
    if len(set(digests)) != 1:
        raise RuntimeError(f"parameters differ across ranks after training (digests {digests}): DDP replicas diverged")
    accelerator.print(f"normscale: parameters identical on all {accelerator.num_processes} ranks")


def finish_process(code: int = 0) -> None:
    """End a multi-process worker: barrier, destroy the process group, flush, then os._exit. Gloo's worker
    threads otherwise abort the interpreter at shutdown in a fraction of runs (INFRA.md). Call it once, after
    all work (a Hydra -m sweep included); a single process just returns."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def gather_indexed(accelerator: Accelerator, items: dict[int, object]) -> dict[int, object]:
    """Union over ranks of {index: value} (values on CPU); every rank gets all of it. Indices must be disjoint."""
    if accelerator.num_processes == 1:
        return dict(items)
    parts = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(parts, items)
    merged = {}
    for part in parts:
        overlap = merged.keys() & part.keys()
        if overlap:
            raise NormscaleError(f"ranks returned the same items {sorted(overlap)[:5]}: the split is not disjoint")
        merged |= part
    return merged


def broadcast_from_main(accelerator: Accelerator, obj):
    """The main process's `obj` on every rank (a decision made once, e.g. which checkpoints still need work)."""
    if accelerator.num_processes == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_on_main(accelerator: Accelerator, decide):
    """`decide()` run by the main process alone, its result on every rank; a NormscaleError it raises is raised on
    every rank (so all exit with its code, and only the main process holds run-directory side effects)."""
    outcome = None
    if accelerator.is_main_process:
        try:
            outcome = (None, decide())
        except Exception as error:  # every rank must learn of it, or the others wait in this broadcast forever
            known = isinstance(error, NormscaleError)
            outcome = (type(error) if known else FaultError,
                       str(error) if known else f"the main process failed: {type(error).__name__}: {error}")
            broadcast_from_main(accelerator, outcome)
            raise
    error_type, value = broadcast_from_main(accelerator, outcome)
    if error_type is not None:
        raise error_type(value)
    return value
