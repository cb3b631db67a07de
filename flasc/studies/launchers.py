"""A study's runs on a cluster: SLURM jobs through submitit, or Ray tasks.

Whatever the launcher, a run is the same thing (`RunJob`): decide on the node whether the run is
fresh or resumes (its folder says), start `train_lora.py` (under torchrun when it has several
GPUs) with its output appended to DIR/logs/NAME.log, wait, and report ok / diverged / failed.
run_experiments.py decides which runs are needed and writes the tables; the run folders live on a
filesystem every node sees.

- SLURM (`--launcher slurm`): one submitit job per run (a job array, `--array-parallelism` at a
  time). When SLURM preempts a job or its time runs out, submitit signals it: RunJob stops its
  train_lora.py with SIGTERM (which checkpoints its last completed round) and asks submitit to
  requeue it; the requeued job resumes from that checkpoint.
- Ray (`--launcher ray`): one task per run with `num_cpus` / `num_gpus`, on the cluster at
  `--ray-address` or on a Ray instance started here; a task whose worker dies is retried, and a
  retried run resumes from its checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flasc.runtime.interrupts import ends_with_this_process
from flasc.studies import runs


class ClusterError(RuntimeError):
    """The launcher cannot be used as asked (a missing package, a bad option); one line."""


def _require(module: str, launcher: str):
    try:
        return __import__(module)
    except ImportError:
        raise ClusterError(
            f"--launcher {launcher} needs the package {module}: pip install -r requirements-cluster.txt"
        ) from None


@dataclass
class Resources:
    gpus: int = 0  # GPUs per run (several: torchrun inside the job)
    cpus: int = 2  # CPU cores per run (its torch threads)
    timeout_min: int = 240  # SLURM: the job's time limit; past it the job is requeued and resumes


class RunJob:
    """One run carried to its end on whatever node executes this (picklable: submitit and Ray ship it)."""

    def __init__(self, spec, out_dir: Path, resources: Resources):
        self.spec, self.out_dir, self.resources = spec, Path(out_dir), resources
        self._proc = None

    def __call__(self) -> str:
        spec, folder = self.spec, self.out_dir / self.spec.name
        state = runs.state_of(spec, self.out_dir)
        if state in ("done", "diverged", "conflict"):
            return {
                "done": "ok",
                "diverged": f"diverged: see {self.log_path()}",
                "conflict": f"failed: {folder} holds a run with another config",
            }[state]
        if state == "fresh" and folder.exists():
            shutil.rmtree(folder)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(self.resources.cpus),
            "MKL_NUM_THREADS": str(self.resources.cpus),
        }
        self.log_path().parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(), "a") as log:
            self._proc = subprocess.Popen(
                runs.command(spec, state, self.out_dir, procs=max(1, self.resources.gpus)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=runs.ROOT,
                preexec_fn=ends_with_this_process(),  # ends with the job
            )
            returncode = self._proc.wait()
        self._proc = None
        return runs.outcome_of(spec, returncode, self.out_dir)

    def log_path(self) -> Path:
        return self.out_dir / "logs" / f"{self.spec.name}.log"

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption and timeout hook: stop the run cleanly (it checkpoints its last
        completed round on SIGTERM) and have the job requeued, to resume from there."""
        import submitit

        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            # This runs as a signal handler inside __call__'s Popen.wait, which holds the Popen's lock:
            # wait for the exit with the system call itself, leaving the process for that wait to reap.
            os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)
        return submitit.helpers.DelayedSubmission(RunJob(self.spec, self.out_dir, self.resources))


# ---------------------------------------------------------------- SLURM through submitit
@dataclass
class SlurmLauncher:
    resources: Resources
    partition: str | None = None
    array_parallelism: int | None = None
    extra: dict | None = None  # further sbatch options: --slurm-KEY VALUE -> slurm_KEY
    local: bool = False  # submitit's local executor: the jobs run on this machine

    def check(self) -> None:
        """Before anything is written: SLURM is here (unless the local executor stands in for it)."""
        if not self.local and shutil.which("sbatch") is None:
            raise ClusterError(
                "--launcher slurm: no SLURM on this machine (sbatch not found); run the study "
                "on the cluster's login node, or add --slurm-local to run its jobs here"
            )

    def describe(self) -> str:
        where = (
            "submitit's local executor"
            if self.local
            else f"SLURM{' partition ' + self.partition if self.partition else ''}"
        )
        return (
            f"one job per run on {where}: {self.resources.gpus} GPU(s), {self.resources.cpus} CPUs, "
            f"{self.resources.timeout_min} min per job" + "".join(f", --{k} {v}" for k, v in (self.extra or {}).items())
        )

    def executor(self, out_dir: Path):
        submitit = _require("submitit", "slurm")
        executor = submitit.AutoExecutor(folder=str(out_dir / "slurm"), cluster="local" if self.local else "slurm")
        params = {
            "timeout_min": self.resources.timeout_min,
            "cpus_per_task": self.resources.cpus,
            "tasks_per_node": 1,
            "nodes": 1,
            "name": "flasc",
        }
        if self.resources.gpus:  # no --gpus-per-node=0 line for CPU runs
            params["gpus_per_node"] = self.resources.gpus
        if not self.local:
            params.update({f"slurm_{k}": v for k, v in (self.extra or {}).items()})
            if self.partition:
                params["slurm_partition"] = self.partition
            if self.array_parallelism:
                params["slurm_array_parallelism"] = self.array_parallelism
        executor.update_parameters(**params)
        return executor

    def submit(self, specs: list, out_dir: Path) -> list:
        executor = self.executor(out_dir)
        with executor.batch():  # one job array
            jobs = [executor.submit(RunJob(spec, out_dir, self.resources)) for spec in specs]
        for spec, job in zip(specs, jobs):
            print(f"[{time.strftime('%H:%M:%S')}] submitted {spec.name}: job {job.job_id}", flush=True)
        return jobs

    def run(self, specs: list, out_dir: Path) -> dict[str, str]:
        jobs = self.submit(specs, out_dir)
        return wait_all({spec.name: job for spec, job in zip(specs, jobs)}, _submitit_outcome)


def _submitit_outcome(job) -> str | None:
    if not job.done():
        return None
    try:
        return job.result()
    except Exception as e:  # the job itself failed (node lost, out of memory): the run is isolated
        return (
            f"failed: job {job.job_id}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}"
        )


# ---------------------------------------------------------------- Ray
@dataclass
class RayLauncher:
    resources: Resources
    address: str | None = None  # an existing cluster; None: a Ray instance on this machine
    local_cpus: int | None = None
    started: bool = False  # this process connected (or started the instance): it disconnects

    def describe(self) -> str:
        return (
            f"one Ray task per run on {self.address or 'a Ray instance started here'}: "
            f"{self.resources.gpus} GPU(s), {self.resources.cpus} CPUs per run"
        )

    def check(self) -> None:
        """Before anything is written: connect to the cluster (or start the local instance)."""
        ray = _require("ray", "ray")
        if ray.is_initialized():
            return
        try:
            ray.init(
                address=self.address,
                num_cpus=None if self.address else (self.local_cpus or os.cpu_count()),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception as e:  # an unreachable address, a cluster of another Ray version
            raise ClusterError(
                f"--launcher ray: cannot reach {self.address or 'a local Ray instance'} "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
            ) from None
        self.started = True

    def run(self, specs: list, out_dir: Path) -> dict[str, str]:
        ray = _require("ray", "ray")
        self.check()
        try:
            task = ray.remote(_ray_task).options(
                num_cpus=self.resources.cpus, num_gpus=self.resources.gpus, max_retries=3
            )
            refs = {spec.name: task.remote(RunJob(spec, out_dir, self.resources)) for spec in specs}
            for name in refs:
                print(f"[{time.strftime('%H:%M:%S')}] submitted {name}", flush=True)
            return wait_all(refs, lambda ref: _ray_outcome(ray, ref))
        finally:
            if self.started:
                ray.shutdown()
                self.started = False


def _ray_task(job: RunJob) -> str:
    return job()


def _ray_outcome(ray, ref) -> str | None:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return None
    try:
        return ray.get(ref)
    except Exception as e:  # the task's worker died past its retries
        return f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def wait_all(handles: dict, outcome_of) -> dict[str, str]:
    """Poll every job until it has an outcome, printing each as it ends."""
    outcome, pending = {}, dict(handles)
    while pending:
        for name, handle in list(pending.items()):
            result = outcome_of(handle)
            if result is not None:
                outcome[name] = result
                del pending[name]
                print(f"[{time.strftime('%H:%M:%S')}] {result.split(':')[0]} {name}", flush=True)
        if pending:
            time.sleep(0.5)
    return outcome


# sbatch options this module sets itself, and the run_experiments.py option that sets each
OWN_SBATCH = {
    "partition": "--slurm-partition",
    "array_parallelism": "--array-parallelism",
    "cpus_per_task": "--cpus-per-run",
    "gpus_per_node": "--gpus-per-run",
    "time": "--timeout-min",
    "nodes": None,
    "ntasks_per_node": None,
    "job_name": None,
}


def check_sbatch_options(extra: dict) -> None:
    """--slurm-KEY VALUE: KEY must be an sbatch option submitit passes on, and not one set here."""
    import submitit

    valid = submitit.SlurmExecutor._valid_parameters()
    for key in extra:
        if key in OWN_SBATCH:
            instead = OWN_SBATCH[key]
            raise ClusterError(
                f"--slurm-{key.replace('_', '-')}: set by the study itself"
                + (f"; use {instead}" if instead else " (one task on one node per run)")
            )
        if key not in valid:
            raise ClusterError(
                f"--slurm-{key.replace('_', '-')}: not an sbatch option submitit passes on; expected "
                f"one of {', '.join(sorted('--slurm-' + k.replace('_', '-') for k in valid if k not in OWN_SBATCH))}"
            )


def launcher_from_args(args, extra: dict) -> SlurmLauncher | RayLauncher:
    _require("submitit" if args.launcher == "slurm" else "ray", args.launcher)  # said before anything runs
    resources = Resources(gpus=args.gpus_per_run, cpus=args.cpus_per_run, timeout_min=args.timeout_min)
    if args.launcher == "slurm":
        check_sbatch_options(extra)
        return SlurmLauncher(resources, args.slurm_partition, args.array_parallelism, extra, args.slurm_local)
    return RayLauncher(resources, args.ray_address)
