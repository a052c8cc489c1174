"""Training checkpoints: a folder per step (safetensors weights, optimizer state loaded weights-only,
meta.json last), written under a temporary name and renamed, the last two kept."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from cidistill.core import faults


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in Path(out).glob("step-*") if (p / "meta.json").exists())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, module, opt, meta: dict | None = None, keep: int = 2) -> Path:
    """Atomic: write into a temp folder, rename it into place; meta.json inside (with `meta`: the data stream's
    position) marks it complete."""
    from safetensors.torch import save

    final = out / f"step-{step:07d}"
    tmp = out / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # bytes written by Python: a full disk is an OSError (the CLI's exit-3 message), not a SafetensorError
    (tmp / "model.safetensors").write_bytes(save({k: v.contiguous() for k, v in module.student.state_dict().items()}))
    (tmp / "heads.safetensors").write_bytes(save({k: v.contiguous() for k, v in module.heads.state_dict().items()}))
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=1))
    faults.point()
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in out.glob("step-*") if p != final)[:-(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, module, opt) -> int:
    """Weights, heads and optimizer state back from `ckpt`; returns its step."""
    from safetensors.torch import load_file

    module.student.load_state_dict(load_file(ckpt / "model.safetensors"))
    module.heads.load_state_dict(load_file(ckpt / "heads.safetensors"))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def clean_partial(out: Path) -> None:
    for leftover in out.glob(".tmp-step-*"):  # a checkpoint a killed run did not finish
        shutil.rmtree(leftover, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (a killed run logged them; they are redone)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError):  # a line the kill cut short
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
