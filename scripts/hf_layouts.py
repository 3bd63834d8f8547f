"""The three ways a Hugging Face checkpoint stores routed experts, and exact conversions between them.

    per-expert  {layer}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight  [F, D], [F, D], [D, F]
                (transformers v4 Mixtral/Qwen-MoE style; what most tools and quantizers expect)
    fused       {layer}.mlp.experts.gate_up_proj [E, 2F, D] (rows: gate, then up), ...experts.down_proj [E, D, F]
                (transformers v5; relu^2 experts: {layer}.mlp.experts.up_proj [E, F, D] instead of gate_up_proj)
    mlx         {layer}.mlp.switch_mlp.{gate_proj,up_proj}.weight [E, F, D], ...switch_mlp.down_proj.weight [E, D, F]
                (mlx-lm's SwitchGLU banks)
relu^2 experts have no gate in any layout. The functions take and return flat {name: tensor} dicts; every other
tensor passes through untouched. A layer whose experts are incomplete (an expert missing, a gate without its up, a
bank without down_proj, banks of different expert counts or shapes) is refused with a ValueError naming the layer.

    python scripts/hf_layouts.py FOLDER --to per-expert|fused|mlx --out NEW_FOLDER

converts a folder written by scripts/export_hf.py: its weights, and config.json's expert_layout, which tells the
model which names to load.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LAYOUTS = ("per-expert", "fused", "mlx")
PATTERNS = {
    "per-expert": re.compile(r"(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight"),
    "fused": re.compile(r"(?P<layer>.+)\.experts\.(?P<proj>gate_up_proj|up_proj|down_proj)"),
    "mlx": re.compile(r"(?P<layer>.+)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight"),
}


class Bank(NamedTuple):
    """One layer's experts: gate [E, F, D] or None (relu^2), up [E, F, D], down [E, D, F]."""
    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor


def split_experts(state: dict[str, torch.Tensor], num_experts: int | None = None) -> tuple[dict, dict[str, Bank]]:
    """(the other tensors, {layer prefix: Bank}), from any layout; num_experts, when known, also catches a missing
    last expert of the per-expert layout."""
    found: dict[str, dict] = {}  # layer -> {"layout": ..., "parts": {...}}
    rest = {}
    for name, tensor in state.items():
        for layout, pattern in PATTERNS.items():
            if m := pattern.fullmatch(name):
                entry = found.setdefault(m["layer"], {"layout": layout, "parts": {}})
                if entry["layout"] != layout:
                    raise ValueError(f"{m['layer']}: experts stored in two layouts ({entry['layout']} and {layout})")
                key = (int(m["expert"]), m["proj"]) if layout == "per-expert" else m["proj"]
                entry["parts"][key] = tensor
                break
        else:
            rest[name] = tensor
    return rest, {layer: _bank(layer, e["layout"], e["parts"], num_experts) for layer, e in found.items()}


def _bank(layer: str, layout: str, parts: dict, num_experts: int | None) -> Bank:
    dims = 2 if layout == "per-expert" else 3  # one expert's matrix, or a bank [experts, out, in]
    for key, t in parts.items():
        if t.ndim != dims:
            name = f"expert {key[0]}'s {key[1]}" if layout == "per-expert" else key
            shape = "a matrix" if dims == 2 else "a bank [experts, out, in]"
            raise ValueError(f"{layer}: {name} is {list(t.shape)}, not {shape}")
    if layout == "per-expert":
        count = num_experts if num_experts is not None else 1 + max(e for e, _ in parts)
        extra = sorted({e for e, _ in parts if e >= count})
        if extra:
            raise ValueError(f"{layer}: expert {extra[0]} is beyond the {count} experts of the config")
        gated = any(proj == "gate_proj" for _, proj in parts)
        projs = ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")
        for e in range(count):
            if not any(i == e for i, _ in parts):
                raise ValueError(f"{layer}: expert {e} of {count} is missing")
            for proj in projs:
                if (e, proj) not in parts:
                    raise ValueError(f"{layer}: expert {e} of {count} has no {proj}")
        for proj in projs:
            shapes = sorted({tuple(parts[e, proj].shape) for e in range(count)})
            if len(shapes) > 1:
                raise ValueError(f"{layer}: the experts' {proj} differ in shape: {', '.join(map(str, map(list, shapes)))}")
        bank = Bank(*(torch.stack([parts[e, p] for e in range(count)]) if p in projs else None for p in
                      ("gate_proj", "up_proj", "down_proj")))
    elif layout == "fused":
        if "gate_up_proj" in parts and "up_proj" in parts:
            raise ValueError(f"{layer}: both gate_up_proj and up_proj; a layer's experts are gated or not")
        if "gate_up_proj" not in parts and "up_proj" not in parts:
            raise ValueError(f"{layer}: down_proj without gate_up_proj or up_proj")
        if "down_proj" not in parts:
            raise ValueError(f"{layer}: experts without down_proj")
        if "gate_up_proj" in parts:
            rows = parts["gate_up_proj"].shape[1]
            if rows % 2:
                raise ValueError(f"{layer}: gate_up_proj has {rows} rows, not a gate half and an up half")
            gate, up = parts["gate_up_proj"].chunk(2, dim=1)
            bank = Bank(gate, up, parts["down_proj"])
        else:
            bank = Bank(None, parts["up_proj"], parts["down_proj"])
    else:
        if "up_proj" not in parts:
            has = "gate_proj" if "gate_proj" in parts else "down_proj"
            raise ValueError(f"{layer}: switch_mlp has {has} but no up_proj")
        if "down_proj" not in parts:
            raise ValueError(f"{layer}: switch_mlp has no down_proj")
        bank = Bank(parts.get("gate_proj"), parts["up_proj"], parts["down_proj"])
    _check_shapes(layer, bank, num_experts)
    return bank


def _check_shapes(layer: str, bank: Bank, num_experts: int | None) -> None:
    e, f, d = bank.up.shape
    if bank.gate is not None and bank.gate.shape != bank.up.shape:
        raise ValueError(f"{layer}: gate {list(bank.gate.shape)} and up {list(bank.up.shape)} differ")
    if bank.down.shape != (e, d, f):
        raise ValueError(f"{layer}: down is {list(bank.down.shape)}, expected [{e}, {d}, {f}] for up "
                         f"{list(bank.up.shape)}")
    if num_experts is not None and e != num_experts:
        raise ValueError(f"{layer}: {e} experts, the config says {num_experts}")


def join_experts(rest: dict, banks: dict[str, Bank], layout: str) -> dict[str, torch.Tensor]:
    """The other tensors, then each layer's experts in `layout`; every tensor its own contiguous copy (safetensors
    refuses views that share storage)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
    out = dict(rest)
    for layer, (gate, up, down) in banks.items():
        if layout == "per-expert":
            for e in range(len(up)):
                if gate is not None:
                    out[f"{layer}.experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{layer}.experts.{e}.up_proj.weight"] = up[e]
                out[f"{layer}.experts.{e}.down_proj.weight"] = down[e]
        elif layout == "fused":
            if gate is None:
                out[f"{layer}.experts.up_proj"] = up
            else:
                out[f"{layer}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"{layer}.experts.down_proj"] = down
        else:
            if gate is not None:
                out[f"{layer}.switch_mlp.gate_proj.weight"] = gate
            out[f"{layer}.switch_mlp.up_proj.weight"] = up
            out[f"{layer}.switch_mlp.down_proj.weight"] = down
    return {name: t.clone().contiguous() for name, t in out.items()}


def convert(state: dict[str, torch.Tensor], layout: str, num_experts: int | None = None) -> dict[str, torch.Tensor]:
    return join_experts(*split_experts(state, num_experts), layout)


def to_per_expert(state: dict[str, torch.Tensor], num_experts: int | None = None) -> dict[str, torch.Tensor]:
    return convert(state, "per-expert", num_experts)


def to_fused(state: dict[str, torch.Tensor], num_experts: int | None = None) -> dict[str, torch.Tensor]:
    return convert(state, "fused", num_experts)


def to_mlx(state: dict[str, torch.Tensor], num_experts: int | None = None) -> dict[str, torch.Tensor]:
    return convert(state, "mlx", num_experts)


def check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new one")


@contextlib.contextmanager
def new_folder(out: Path):
    """A staging folder beside `out`, renamed to `out` when the block succeeds and removed when it fails: a failed
    write never leaves a folder that looks finished. `out` must not exist or be empty."""
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        # mkdtemp makes the folder 700 and safetensors writes 600: give them the modes the umask gives new files.
        umask = os.umask(0)
        os.umask(umask)
        for path in (staging, *staging.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_folder(source: Path, layout: str, out: Path) -> None:
    config_path, weights_path = source / "config.json", source / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{source}: not an exported model folder (config.json and model.safetensors)")
    check_new_folder(out)
    try:
        config = json.loads(config_path.read_bytes())
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{config_path}: not JSON ({e})") from None
    num_experts = config.get("num_experts") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not (num_experts is None or type(num_experts) is int and num_experts > 0):
        raise ValueError(f"{config_path}: not export_hf.py's config (a JSON object whose num_experts, if any, is a count)")
    try:
        weights = load_file(weights_path)
    except SafetensorError as e:
        raise ValueError(f"{weights_path}: not a safetensors file ({e})") from None
    state = convert(weights, layout, num_experts)
    with new_folder(out) as folder:
        for file in source.iterdir():
            if file.is_file() and file.name not in ("config.json", "model.safetensors"):
                shutil.copy2(file, folder / file.name)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, "expert_layout": layout}, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by scripts/export_hf.py")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="the expert layout to write")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) folder")
    args = parser.parse_args(argv)
    try:
        convert_folder(args.folder, args.to, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.folder} to {args.out} (layout {args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
