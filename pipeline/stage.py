"""The skeleton every stage shares: setup, the up-to-date check, upstream integrity, start, finish.

    stage = Stage.open(cfg, "compress")                  # devices/DDP, threads, folder, rank-0 logging
    teacher_sha = stage.require("finetune", ["teacher.pt"])   # upstream manifest + sha256, or a clear error
    if stage.up_to_date(config_hash, inputs, force): return stage.skipped()
    stage.start()                                        # previous outputs set aside, manifest removed
    ...                                                  # the stage's recipe
    stage.finish(outputs, timings, extra)                # config.json + manifest.json, written last
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts

_LOCKS: dict[str, int] = {}
CHECKPOINT = "checkpoint.pt"   # a stage's training state while it runs (finetune, compress)
COMMANDS = {"finetune": "make finetune", "compress": "make compress", "export": "make export"}


def one_process_only(name: str) -> bool:
    """For export and serve, which run once whatever launched them: under torchrun (WORLD_SIZE > 1) N copies would
    race on the same files (export) or port (serve), and time latency under each other's load. Rank 0 runs the stage
    alone, without a process group; every other rank says so and returns at once (exit code 0: torchrun then sees
    success, not a failure that tears down rank 0). -> whether this process runs it."""
    world, rank = int(os.environ.get("WORLD_SIZE") or 1), int(os.environ.get("RANK") or 0)
    if world <= 1:
        return True
    if rank != 0:
        print(f"[{name}] rank {rank} of {world}: {name} runs in one process (rank 0); this rank exits", flush=True)
        return False
    print(f"[{name}] launched as {world} processes: {name} runs once, on rank 0, without a process group "
          f"(`make {name}` starts one process)", flush=True)
    return True


class StageError(RuntimeError):
    """A stage can't run on what it was given (missing or changed upstream artifacts); says what to run."""


@dataclass
class Stage:
    name: str
    cfg: object
    dir: Path
    dist: object = None
    device: object = None
    t_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, cfg, name: str, distributed: bool = True) -> "Stage":
        from pipeline import engine

        if distributed:
            dist, device = engine.setup_run(cfg.run)
        else:  # export runs once, on the CPU it measures, whatever launched it
            dist, device = engine.DistInfo(), engine.resolve_device("cpu")
            engine.set_threads(cfg.run.threads)
        stage = cls(name=name, cfg=cfg, dir=cfg.run_dir / name, dist=dist, device=device)
        if dist.is_main:
            stage.dir.mkdir(parents=True, exist_ok=True)
            stage.lock()
        return stage

    def lock(self) -> None:
        """One run at a time per run folder: an flock on run.dir/.lock, held until this process exits (a crash or
        kill -9 releases it too). A second run would interleave its writes with this one's."""
        import fcntl

        path = self.cfg.run_dir / ".lock"
        if str(path.resolve()) in _LOCKS:  # this process holds it already (stages run one after another)
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StageError(f"another pipeline process is using run.dir={self.cfg.run.dir} ({path} is locked). "
                             f"Wait for it to finish, or use another run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.name}\n".encode())
        _LOCKS[str(path.resolve())] = fd  # kept open (and locked) for the life of the process

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.name}] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        self.log("!" * 78 + f"\n[{self.name}] WARNING: {msg}\n[{self.name}] " + "!" * 78)

    def require(self, upstream: str, files: list[str]) -> dict[str, str]:
        """sha256 of each upstream file, checked against the upstream stage's manifest.

        A missing manifest (the stage never finished, or is rerunning) or a file that changed since it
        was written is an error naming the command to run: nothing is built on stale or partial inputs.
        """
        up_dir = self.cfg.run_dir / upstream
        command = f"{COMMANDS.get(upstream, upstream)} (same CONFIG/ARGS, run.dir={self.cfg.run.dir})"
        manifest = up_dir / artifacts.MANIFEST
        if not manifest.exists():
            raise StageError(f"{manifest} is missing: the {upstream} stage has not finished (or is running). "
                             f"Run `{command}` first")
        recorded = artifacts.read_json(manifest).get("outputs", {})
        out = {}
        for name in files:
            path = up_dir / name
            if not path.exists():
                raise StageError(f"{path} is missing although {upstream} finished: run `{command}` again")
            digest = artifacts.sha256_file(path)
            if recorded.get(name) != digest:
                raise StageError(f"{path} changed after the {upstream} stage wrote it (sha256 differs from its "
                                 f"manifest). Run `{command}` again to rebuild it")
            out[name] = digest
        return out

    def save_checkpoint(self, amp, **state) -> None:
        """Rank 0 writes checkpoint.pt (engine.save_checkpoint) with the device type and AMP dtype (`amp`, None for
        fp32) that trained it (engine.checkpoint_meta): a resume on another device or precision can then say so."""
        from pipeline import engine

        if self.is_main:
            engine.save_checkpoint(self.dir / CHECKPOINT, **state, **engine.checkpoint_meta(self.device, amp))

    def resume_checkpoint(self, is_valid, amp_setting) -> dict | None:
        """checkpoint.pt on every rank if it is this run's (is_valid(ckpt)), else None on every rank. Rank 0 reads and
        checks it and the others get its copy (engine.resume_checkpoint): ranks that resumed different epochs would
        wait on each other forever, and other nodes need no shared disk. amp_setting (finetune.amp / compress.amp):
        a checkpoint from another device type or AMP dtype resumes with a note that the run is not bit-identical."""
        from pipeline import engine

        def valid(ckpt: dict) -> bool:
            ok = is_valid(ckpt)
            if not ok:
                self.log("checkpoint is from another config, data, teacher or world size: starting over")
            return ok
        ckpt = engine.resume_checkpoint(self.dir / CHECKPOINT, valid)
        if ckpt is not None:
            with warnings.catch_warnings():  # the stage resolves its AMP dtype again, and warns (bf16 emulated) there
                warnings.simplefilter("ignore")
                amp = engine.amp_dtype(amp_setting, self.device)
            change = engine.resume_change(ckpt, self.device, amp)
            if change:
                self.log(change)
        return ckpt

    def load_artifact(self, name: str) -> tuple:
        """(model on this rank's device, meta) of the model artifact self.dir/name, on every DDP rank: rank 0 reads
        the file and the others get its copy (engine.broadcast_state_dict). So they need no view of a file rank 0
        has just replaced (a shared disk may show another node the old one for a while), nor a shared disk."""
        from models import model_from_artifact
        from pipeline import engine

        path = self.dir / name
        blob = engine.broadcast_state_dict(artifacts.torch_load(path) if self.is_main else None)
        return model_from_artifact(blob, self.device, source=path)

    def up_to_date(self, config_hash: str, inputs: dict, force: bool) -> bool:
        current = not force and artifacts.manifest_is_current(self.dir, config_hash, inputs)
        if current:
            self.log(f"up to date, skipping ({self.dir / artifacts.MANIFEST}; use --force to rerun)")
        return current

    def skipped(self) -> dict:
        return {"skipped": True, "stage_dir": str(self.dir)}

    def start(self, resuming: bool = False, keep: tuple[str, ...] = ("teacher_logits.pt",)) -> None:
        """Remove the manifest; unless resuming from this stage's own matching checkpoint, set every previous
        output aside (into .previous/, deleted when the stage finishes), so that no mix of old and new files
        can ever look current."""
        from pipeline import engine

        engine.barrier()
        if self.is_main:
            artifacts.invalidate(self.dir)
            for leftover in self.dir.glob(".*"):  # temp files of a killed write (atomic_path: .<name>.<random>)
                if leftover.is_file():
                    leftover.unlink(missing_ok=True)
            for leftover in self.dir.glob(".work.*"):  # export's scratch folder of a killed run
                shutil.rmtree(leftover, ignore_errors=True)
            if not resuming:
                aside = self.dir / ".previous"
                shutil.rmtree(aside, ignore_errors=True)
                for path in list(self.dir.iterdir()):  # `keep`: caches keyed by their own inputs
                    if not path.name.startswith(".") and path.name not in keep:
                        aside.mkdir(exist_ok=True)
                        path.rename(aside / path.name)
        engine.barrier()

    def finish(self, outputs: list[str], timings: dict | None = None, extra: dict | None = None,
               config_hash: str = "", inputs: dict | None = None) -> dict:
        artifacts.write_json(self.dir / "config.json", self.cfg.to_dict())
        timings = {"total_seconds": round(time.perf_counter() - self.t_start, 2), **(timings or {})}
        manifest = artifacts.write_manifest(self.dir, self.name, config_hash, inputs or {},
                                            sorted(set(outputs) | {"config.json"}), timings, extra)
        shutil.rmtree(self.dir / ".previous", ignore_errors=True)
        return manifest
