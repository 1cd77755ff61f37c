"""`hydra/launcher=slurm` and `hydra/launcher=local` with pack=N: one submitit job per pack (issue 13).

hydra_plugins.normscale_launcher's SlurmLauncher and LocalLauncher are hydra-submitit-launcher's with PackLauncher
mixed in (Hydra instantiates launchers only from the hydra_plugins package). With pack=1 they are those launchers:
one job per sweep point, running the task function, which sends back (cli.JobOutcome) a point it skipped or the
error that ended it instead of exiting the job, so the sweep reports them as the default launcher does. With pack=N the launcher composes every point's Config, forms
the packs (normscale.pack.forming) and submits one job per pack through the base launcher's executor; the job
composes its members' configs again and trains them with the command's pack entry (train.train_pack; a command
that trains nothing, such as eval, gets the base launcher's jobs). The job's callable is the launcher itself,
whose `checkpoint` resubmits it with the same arguments: a pack that SLURM warns with USR2 saves every run's resume
state (train.Preemption hands the signal to submitit), is requeued and resumes. The runs a pack left out or that
failed come back to this process in cli.LAUNCHER_SKIPPED, which cli.hydra_main lists and turns into the sweep's exit code as for
the default launcher. Importing this module imports nothing heavy: Hydra imports every plugin at start-up.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

class PackLauncher:
    """Mixed into hydra-submitit-launcher's launchers, before them (hydra_plugins.normscale_launcher)."""

    packs: dict[int, list[list[str]]] | None = None  # pack mode: job number -> its points' overrides
    pack_entry = None  # pack mode: the command's pack entry (cli.PACKED_ENTRY), carried into the jobs

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """In the submitting process: the base launcher's jobs (pack=1), or a job per pack, waited for."""
        from hydra.core.utils import JobReturn, JobStatus

        from normscale import cli
        from normscale.cli import fail, to_config
        from normscale.config import NormscaleError
        from normscale.pack.forming import form_packs

        if self.config.pack == 1 or cli.PACKED_ENTRY is None:  # solo, or a command that trains nothing (eval, data)
            returns = super().launch(job_overrides, initial_job_idx)
            self.report({f"point {initial_job_idx + j}": r.return_value for j, r in enumerate(returns)
                         if r.status == JobStatus.COMPLETED and isinstance(r.return_value, cli.JobOutcome)})
            return returns
        self.pack_entry = cli.PACKED_ENTRY  # pickled with the launcher into each job
        if self.config.pack == "auto":
            fail(f"pack=auto with hydra/launcher={self.config.hydra.runtime.choices['hydra/launcher']}: a pack's size "
                 "is fixed when its job is submitted, before the job sees its device; give pack=N")
        try:
            configs = [to_config(self.compose(overrides)) for overrides in job_overrides]
        except NormscaleError as error:
            fail(str(error), error.exit_code)
        packs = form_packs(configs, configs[0].pack)
        common = set.intersection(*(set(overrides) for overrides in job_overrides))
        points = [f"points {', '.join(str(initial_job_idx + m) for m in members)}" for members in packs]
        for j, members in enumerate(packs):  # each pack's points, with the overrides in which they differ
            varying = [" ".join(o for o in job_overrides[m] if o not in common) for m in members]
            print(f"normscale: pack {j}: {points[j]}" + (f" ({' | '.join(varying)})" if any(varying) else ""),
                  flush=True)
        self.packs = {initial_job_idx + j: [list(job_overrides[m]) for m in members] for j, members in enumerate(packs)}
        outcomes = super().launch([[shown] for shown in points], initial_job_idx)  # shown in Hydra's job lines
        self.report({f"pack {j}": outcome for j, outcome in enumerate(outcomes)})
        return [JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED) for overrides in job_overrides]

    @staticmethod
    def report(outcomes: dict) -> None:
        """The jobs' cli.JobOutcome, by job ("pack 0", "point 3"), once every job is done: skipped points go into
        cli.LAUNCHER_SKIPPED (hydra_main lists them and ends with their code); the first error ends the sweep with its
        line and code."""
        from normscale.cli import LAUNCHER_SKIPPED, fail

        for outcome in outcomes.values():
            for code, line, overrides in outcome.skipped:
                print(f"normscale: skipped: {line}", file=sys.stderr, flush=True)
                LAUNCHER_SKIPPED.append((code, " ".join(overrides)))
        errors = [(job, outcome.error) for job, outcome in outcomes.items() if outcome.error]
        for job, (_, line) in errors[1:]:
            print(f"normscale: error: {job}: {line}", file=sys.stderr, flush=True)
        if errors:
            job, (code, line) = errors[0]
            fail(f"{job}: {line}", code)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> Any:
        """In the job: one sweep point (the base launcher's), or in pack mode the pack of job number `job_num`."""
        from normscale import cli

        if self.packs is None:
            cli.LAUNCHER_JOB = True  # the task function returns a point's error instead of exiting this job
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals

        Singleton.set_state(singleton_state)
        setup_globals()
        try:
            composed = [self.compose(overrides) for overrides in self.packs[job_num]]
            problems = self.pack_entry([(cli.to_config(cfg), list(cfg.hydra.overrides.task)) for cfg in composed])
        except cli.NormscaleError as error:  # sent back: the launcher ends the sweep with its line and code
            return cli.JobOutcome([], (error.exit_code, str(error)))
        return cli.JobOutcome([(error.exit_code, str(error), overrides) for error, overrides in problems])

    def compose(self, overrides: Sequence[str]):
        """A sweep point's Hydra config, as the base launcher composes it in its job."""
        from normscale.cli import hydra_errors

        with hydra_errors():
            return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
