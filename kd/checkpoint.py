"""Training checkpoints on the train stage's store (a local folder or an object store): a folder per step
(safetensors weights, optimizer state loaded weights-only), each file published atomically and meta.json
written last, which marks the checkpoint complete; the last two kept. The training log travels the same way."""
from __future__ import annotations

import io
import json
import time

import torch

from cidistill.core import faults
from cidistill.core.errors import StageError
from cidistill.core.store import Store

LOG = "log.jsonl"


def latest_checkpoint(out: Store) -> str | None:
    """The newest complete checkpoint's folder name (`step-0000100`), or None."""
    done = sorted(n.split("/")[0] for n in out.glob("step-*/meta.json"))
    return done[-1] if done else None


def save_checkpoint(out: Store, step: int, module, opt, meta: dict | None = None, keep: int = 2) -> str:
    """`meta` (the data stream's position) goes into meta.json, the checkpoint's done-marker."""
    from safetensors.torch import save

    name = f"step-{step:07d}"
    out.rm(name)  # a partial one a killed run left at this step
    # bytes written by Python: a full disk is an OSError (the CLI's exit-3 message), not a SafetensorError
    out.write_bytes(f"{name}/model.safetensors", save({k: v.contiguous() for k, v in module.student.state_dict().items()}))
    out.write_bytes(f"{name}/heads.safetensors", save({k: v.contiguous() for k, v in module.heads.state_dict().items()}))
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "step": step}, buf)
    out.write_bytes(f"{name}/state.pt", buf.getvalue())
    faults.point()
    out.write_json(f"{name}/meta.json", {"step": step, "time": time.time(), **(meta or {})})
    for old in sorted(n for n in out.glob("step-*") if n != name)[:-(keep - 1) or None]:
        out.rm(old)
    return name


def load_weights(out: Store, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's student weights (`name`: a checkpoint folder, or any safetensors file on the store)."""
    from safetensors.torch import load

    return load(out.read_bytes(name if name.endswith(".safetensors") else f"{name}/model.safetensors"))


def load_checkpoint(out: Store, name: str, module, opt) -> int:
    """Weights, heads and optimizer state back from checkpoint `name`; returns its step."""
    from safetensors.torch import load

    module.student.load_state_dict(load_weights(out, name))
    module.heads.load_state_dict(load(out.read_bytes(f"{name}/heads.safetensors")))
    state = torch.load(io.BytesIO(out.read_bytes(f"{name}/state.pt")), map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def resume_checkpoint(out: Store, module, opt, say=print) -> tuple[str | None, int]:
    """(name, step) of the newest complete checkpoint that loads, restored into module and opt; (None, 0) when
    there is none. A damaged one (cut short by a copy of the work folder that stopped, a file lost) is named
    and passed over for the one before it, which restores everything again: the run stays exact."""
    names = sorted({n.split("/")[0] for n in out.glob("step-*/meta.json")}, reverse=True)
    for i, name in enumerate(names):
        try:
            return name, load_checkpoint(out, name, module, opt)
        except OSError as e:
            if not isinstance(e, FileNotFoundError):  # a store that failed to answer: not the file's fault
                raise
            why = f"{e.filename or e} is missing"
        except Exception as e:  # SafetensorError, torch's unpickler on a cut-off file, a wrong shape
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if i + 1 == len(names):
            raise StageError(f"no checkpoint in {out.uri} can be read ({name}: {why}): rerun with --force to train "
                             "from the start")
        if say:
            say(f"[train] checkpoint {name} cannot be read ({why}); resuming from {names[i + 1]}")
    return None, 0


def clean_partial(out: Store) -> None:
    """Checkpoint folders a killed run did not finish (no meta.json)."""
    done = {n.split("/")[0] for n in out.glob("step-*/meta.json")}
    for name in out.glob("step-*"):
        if name not in done:
            out.rm(name)


def read_log(out: Store, step: int) -> list[str]:
    """On resume: the log's lines up to the checkpoint's step (a killed run logged later ones; they are redone)."""
    if not out.exists(LOG):
        return []
    keep = []
    for ln in out.read_bytes(LOG).decode().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError):  # a line cut short
            pass
    return keep


def write_log(out: Store, lines: list[str]) -> None:
    out.write_bytes(LOG, "".join(ln + "\n" for ln in lines).encode())
