"""``train.py``: recipe + data -> checkpoints, TensorBoard logs and an exported model.

Run folder layout::

    RUN_DIR/config.yaml        the resolved recipe
    RUN_DIR/checkpoints/       top-k by the recipe's monitor, plus last.ckpt
    RUN_DIR/logs/              TensorBoard events
    RUN_DIR/model/             the exported best checkpoint (engine model folder)
    RUN_DIR/summary.json       best checkpoint, validation metrics, timings

Multi-GPU and multi-node training is Lightning's DDP (``--devices``, ``--num-nodes``,
``--strategy ddp``); Lightning's launcher, torchrun and SLURM all work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import List, Optional

from .errors import ConfigError

RUN_DIR_ENV = "LIVERTUMORSEG_RUN_DIR"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train the LiverTumorSeg 3D U-Net (MSD Task03 layout).")
    p.add_argument("--data-dir", type=Path, required=True, help="folder with dataset.json, imagesTr/, labelsTr/")
    p.add_argument("--config", default=None,
                   help="recipe YAML, or a name in Training/configs (seed, default, smoke, demo)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>-<time>)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="preprocessing cache (default: <data-dir>/.livertumorseg-cache/<spacing>-<orientation>-<hash>, "
                        "e.g. 1.5x1.5x1.5mm-LPS-3f9c20ab, the hash of its preprocessing settings and code)")
    p.add_argument("--folds", type=int, default=None, help="k-fold cross-validation: number of folds")
    p.add_argument("--fold", type=int, default=None, help="which fold validates (0-based)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/last.ckpt")
    p.add_argument("--devices", default=None, help="Lightning devices: a count, a list like 0,1, or auto")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes for multi-node DDP")
    p.add_argument("--strategy", default=None, help="Lightning strategy, e.g. ddp")
    p.add_argument("--accelerator", default=None, help="cpu, gpu, cuda, mps or auto")
    p.add_argument("--no-export", action="store_true", help="do not export RUN_DIR/model at the end")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_epochs=3 optimizer.lr=3e-4")
    return p


def _devices(value: Optional[str]):
    if value is None or value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value)


def resolve_config(args) -> dict:
    """The recipe with command-line flags folded in (a resumed run defaults to its own)."""
    from .config import load_config

    spec = args.config
    if spec is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        spec = str(Path(args.out) / "config.yaml")
    config = load_config(spec, args.overrides)
    if args.folds is not None:
        config["data"]["folds"] = args.folds
    if args.fold is not None:
        if config["data"]["folds"] is None:
            raise ConfigError(f"--fold {args.fold} needs --folds K (the number of folds); without it the split "
                              "is data.validation_fraction's and no fold is used")
        config["data"]["fold"] = args.fold
    trainer = config["trainer"]
    for key, value in (("devices", _devices(args.devices)), ("num_nodes", args.num_nodes),
                       ("strategy", args.strategy), ("accelerator", args.accelerator)):
        if value is not None:
            trainer[key] = value
    from .config import validate

    validate(config)
    return config


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: fp16 mixed on CUDA (bf16 where supported), bf16 mixed on CPUs with native
    bf16, else full fp32. Anything else is passed to Lightning as is."""
    if precision != "auto":
        return precision
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    from LiverTumorSegLib.resources import cpu_supports_bf16

    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_supports_bf16() else "32-true"


def _started_as_one_of_many() -> bool:
    """True when a launcher other than Lightning's own started several processes at once:
    torchrun (WORLD_SIZE), or srun with several tasks as Lightning detects it (an
    interactive allocation, job name ``bash`` or ``interactive``, is not)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    def count(name: str) -> int:
        try:
            return int(os.environ.get(name, "1"))
        except ValueError:
            return 1

    return count("WORLD_SIZE") > 1 or (SLURMEnvironment.detect() and count("SLURM_NTASKS") > 1)


def run_dir_for(args, config: dict) -> Path:
    """The run folder; fixed once per launch so DDP children (re-run by Lightning) agree."""
    if args.out is not None:
        run_dir = Path(args.out)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        if args.resume:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        if _started_as_one_of_many():
            raise ConfigError("give --out RUN_DIR when torchrun or SLURM starts the processes: each would "
                              "otherwise name its own time-stamped run folder")
        run_dir = Path("runs") / f"{config['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir.resolve()


def refuse_a_used_run_dir(run_dir: Path) -> None:
    """A new run must not start in a folder that holds another run's checkpoints or logs:
    Lightning would save beside them (``last-v1.ckpt``), the logs would mix, and a later
    ``--resume`` would continue the old run. Every process checks, before ``fit``: DDP's
    processes start and nothing is written there but ``config.yaml`` until all have
    joined. A SLURM job requeued by Lightning (``SLURM_RESTART_COUNT`` above 0, with the
    ``hpc_ckpt_*.ckpt`` Lightning saved there and resumes from by itself) is let through."""
    if os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0") and any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return
    used = sorted(str(p.relative_to(run_dir)) for pattern in ("checkpoints/*.ckpt", "logs/**/events.out.tfevents.*")
                  for p in run_dir.glob(pattern))
    if used:
        shown = ", ".join(used[:3]) + (", ..." if len(used) > 3 else "")
        advice = ("continue it with --resume, or choose another --out" if (run_dir / "checkpoints" / "last.ckpt").is_file()
                  else "it has no checkpoints/last.ckpt to resume from; choose another --out, or delete the folder")
        raise ConfigError(f"{run_dir} already holds a run ({shown}); {advice}")


def build_trainer(config: dict, run_dir: Path):
    """A Lightning Trainer for the recipe: checkpoints, TensorBoard, LR monitor, progress bar."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    t, ckpt = config["trainer"], config["checkpoint"]
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="epoch{epoch:03d}-step{step:07d}", auto_insert_metric_name=False,
        monitor=ckpt["monitor"], mode=ckpt["mode"], save_top_k=int(ckpt["save_top_k"]), save_last=True,
    )
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=int(t["max_epochs"]), max_steps=int(t["max_steps"]),
        accelerator=t["accelerator"], devices=t["devices"], num_nodes=int(t["num_nodes"]), strategy=t["strategy"],
        precision=resolve_precision(str(t["precision"]), str(t["accelerator"])),
        logger=TensorBoardLogger(str(run_dir), name="logs", version="", default_hp_metric=False),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), TQDMProgressBar(refresh_rate=1)],
        check_val_every_n_epoch=int(t["check_val_every_n_epoch"]), log_every_n_steps=int(t["log_every_n_steps"]),
        gradient_clip_val=t["gradient_clip_val"], deterministic=t["deterministic"],
        use_distributed_sampler=False, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1,  # a fresh, reseeded training queue per epoch (see .data)
    )


def train(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``Training/train.py``; returns the exit code."""
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    run_dir = run_dir_for(args, config)
    if args.resume and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"--resume: {run_dir / 'checkpoints' / 'last.ckpt'} does not exist")
    if not args.resume:
        refuse_a_used_run_dir(run_dir)

    import lightning as L
    from lightning.pytorch.accelerators import CPUAccelerator

    from LiverTumorSegLib.allocator import reuse_freed_memory

    from .config import dump_config
    from .data import LiverDataModule
    from .module import LiverSegModule
    from .provenance import command_line, environment, git_state, now_utc

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    L.seed_everything(int(config["seed"]), workers=True)
    datamodule = LiverDataModule(args.data_dir, config, args.cache_dir)
    datamodule.split()
    provenance = {"command": command_line(), "git": git_state(), "environment": environment(),
                  "started_utc": now_utc(), "run_dir": str(run_dir)}
    data_summary = datamodule.data_summary()
    if args.resume:
        check_resume(run_dir / "checkpoints" / "last.ckpt", config, data_summary)
    module = LiverSegModule(config, data_summary, provenance)
    trainer = build_trainer(config, run_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
    started = time.perf_counter()
    # On the CPU every training step frees and re-allocates activations of ~100 MB;
    # keep them for reuse rather than re-faulting them in page by page (same results).
    with reuse_freed_memory(enabled=isinstance(trainer.accelerator, CPUAccelerator)):
        trainer.fit(module, datamodule=datamodule, ckpt_path="last" if args.resume else None)
    if not trainer.is_global_zero:
        return 0
    summary = finish(trainer, datamodule, run_dir, export=not args.no_export,
                     train_seconds=time.perf_counter() - started)
    print(json.dumps(summary, indent=2))
    return 0


#: What a resumed run may change: how long and where it runs, how it is checked and
#: exported. Everything else (data, grid, sampling, augmentation, network, loss,
#: optimiser, schedule, seed) is what the checkpoint was trained with.
RESUMABLE_CHANGES = ("name", "description", "recipe_file", "trainer.", "validation.", "checkpoint.", "export.",
                     "sampling.num_workers", "data.cache_workers")


def check_resume(checkpoint_path: Path, config: dict, data_summary: dict) -> None:
    """Refuse, before anything is written, to resume a run with another recipe or split:
    the weights would not fit (a size mismatch deep in Lightning), or the model card would
    list validation cases the model trained on."""
    from .config import check_types
    from .exporting import read_checkpoint
    from .module import CHECKPOINT_KEY

    saved = read_checkpoint(checkpoint_path)[CHECKPOINT_KEY]
    recipe = copy.deepcopy(saved.get("config", {}))
    check_types(recipe, lenient=True)  # as this version reads it (an lr saved as the text '3e-4': the number)
    old, new = _flatten(recipe), _flatten(config)
    changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key)
                     and not key.startswith(RESUMABLE_CHANGES))
    if changed:  # every key named; the values of the first few (a whole other recipe would be a page)
        shown = ", ".join(f"{key} ({old.get(key)!r} -> {new.get(key)!r})" if i < 4 else key
                          for i, key in enumerate(changed))
        raise ConfigError(f"--resume: the recipe differs from the one {checkpoint_path} was trained with in "
                          f"{len(changed)} key(s): {shown}; "
                          "resume with the run's own config.yaml (drop --config), changing only trainer.*, worker counts, "
                          "validation.*, checkpoint.* or export.*, or start a new run")
    data = saved.get("data", {})
    for split in ("training_cases", "validation_cases"):
        if split in data and list(data[split]) != list(data_summary[split]):
            raise ConfigError(f"--resume: the {split.replace('_', ' ')} differ from those {checkpoint_path} was "
                              "trained with (another --folds/--fold, an edited dataset.json or another --data-dir); "
                              "resume on the same data and split, or start a new run")
    before, now = data.get("case_fingerprints") or {}, data_summary.get("case_fingerprints") or {}
    differ = [case for case in now if case in before and before[case] != now[case]]
    if differ:  # same names, other images (a checkpoint from before this record has none to compare)
        raise ConfigError(f"--resume: {len(differ)} case(s) of {data_summary.get('data_dir')} are not the ones "
                          f"{checkpoint_path} was trained on, though named alike (e.g. {', '.join(differ[:3])}: "
                          "another grid or other file sizes); was it trained on another --data-dir "
                          f"({data.get('data_dir', 'unknown')})? Resume on the same data, or start a new run")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def finish(trainer, datamodule, run_dir: Path, export: bool, train_seconds: float) -> dict:
    """Export the best checkpoint to RUN_DIR/model (and score it on the validation cases
    with the engine when the recipe asks), then write RUN_DIR/summary.json."""
    from LiverTumorSegLib.atomic import atomic_write_text

    callback = trainer.checkpoint_callback
    best = callback.best_model_path or callback.last_model_path
    summary = {"run_dir": str(run_dir), "best_checkpoint": best, "global_step": int(trainer.global_step),
               "epochs": int(trainer.current_epoch), "train_seconds": round(train_seconds, 1),
               "best_score": None if callback.best_model_score is None else float(callback.best_model_score),
               "monitor": callback.monitor}
    if export and best:
        from .exporting import export_checkpoint, update_card_metrics

        model_dir = export_checkpoint(Path(best), run_dir / "model")
        summary["model_dir"] = str(model_dir)
        config = datamodule.config
        if config["export"]["evaluate_validation"]:
            from .evaluation import evaluate_cases

            report = evaluate_cases(model_dir, datamodule.val_cases, run_dir / "validation", progress=True)
            engine = {"split": "validation", "cases": len(datamodule.val_cases), "mean": report["mean"],
                      "detection": report["detection"]["overall"], "path": "LiverTumorSegLib.pipeline.Segmenter"}
            update_card_metrics(model_dir, {"validation_engine": engine})
            summary["validation_engine_mean"] = report["mean"]
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
