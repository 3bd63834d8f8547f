r"""Export variants of one trained model side by side: artifact bytes and roundtrip val_bpb per export setting.

    SAVE_FP32=1 python train_moe.py                    # also writes artifacts/<RUN_ID>.fp32.pt
    python scripts/export_sweep.py artifacts/<RUN_ID>.fp32.pt \
        "before:QUANT_METHOD=rtn QUANT_CLIP_SIGMAS=0" "gptq:QUANT_METHOD=gptq" "fit:QUANT_METHOD=gptq QUANT_FIT=1" \
        [--json sweep.json]

A variant is NAME:SETTINGS, trainer settings on top of the run's own (saved in the checkpoint). Each one exports the
same weights as the trainer would (calibration batches from the start of the run's train shards), packs them, reads
the artifact back into a fresh model and scores it on the whole val split. The weights before export are scored once
first, so a variant's quantization gap is its roundtrip minus that, free of run-to-run noise. Scoring is eager (no
compile per variant) at the run's EVAL_STRIDE. A table on stdout, the same rows as JSON; while it works, a bar on a
terminal, `progress` lines elsewhere.
"""
import argparse
import json
import math
import pickle
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe as tm  # noqa: E402
from data.progress import progress  # noqa: E402


class PrintLog:
    """The trainer's key:value lines on stdout, for what export logs on its way (QUANT_FIT's options and choice)."""

    def metrics(self, event: str, **values):
        tqdm.write(f"{event} " + " ".join(f"{k}:{tm._show(k, v)}" for k, v in values.items()))  # above a bar


# What a variant may change: the export. Anything else would not fit the checkpoint's weights.
EXPORT_SETTINGS = re.compile(r"QUANT_\w+|GPTQ_DAMP|CALIBRATION_\w+|LQER_\w+|ARTIFACT_LIMIT_BYTES")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, colon, settings = spec.partition(":")
    pairs = [item.partition("=") for item in settings.split()]
    if not name or not colon or any(not key or not sep for key, sep, _ in pairs):
        raise ValueError(f"variant {spec!r}: expected NAME:KEY=VALUE [KEY=VALUE ...]")
    for key, _, _ in pairs:
        if not EXPORT_SETTINGS.fullmatch(key):
            raise ValueError(f"variant {spec!r}: {key} is not an export setting (QUANT_*, GPTQ_DAMP, CALIBRATION_*, "
                             "ARTIFACT_LIMIT_BYTES); a sweep exports one run's weights")
    return name, {key: value for key, _, value in pairs}


def sweep(checkpoint: Path, variants: list[tuple[str, dict]], log=PrintLog()) -> list[dict]:
    try:
        saved = torch.load(checkpoint, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{checkpoint}: not a checkpoint torch can read ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) or not isinstance(saved.get("state"), dict):
        raise ValueError(f"{checkpoint}: not a SAVE_FP32=1 checkpoint of train_moe.py (settings and state)")
    base = tm.Hyperparameters(saved["settings"])
    configs = [tm.Hyperparameters({**saved["settings"], **settings}) for _, settings in variants]  # all checked first
    try:  # before the val split is read: a tensor missing or of another shape
        tm.GPT(base).load_state_dict(saved["state"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{checkpoint}: its tensors do not fit train_moe.py's model for its settings "
                         f"({' '.join(str(e).split())[:300]})") from None
    sp, val_tokens = base.check_inputs()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tables = tm.build_byte_tables(sp, device)
    code_bytes = len(tm.SOURCE)

    def score(cfg, state) -> float:
        model = tm.GPT(cfg).to(device)
        model.load_state_dict(state)
        return tm.evaluate(model.token_losses, val_tokens, tables, cfg, device, cfg.eval_stride)[1]

    print(f"sweep_start variants:{len(variants)} scorings:{len(variants) + 1} val_tokens:{val_tokens.numel() - 1} "
          f"eval_stride:{base.eval_stride} device:{device.type}", flush=True)
    with progress(total=len(variants) + 1, desc="sweep", unit="scoring") as bar:
        pre_export = score(base, saved["state"])
        rows = [dict(variant="pre-export", val_bpb=pre_export)]
        bar.update()
        tqdm.write(f"sweep variant:pre-export val_bpb:{pre_export:.6f}")
        for (name, settings), cfg in zip(variants, configs):
            cfg.model_settings = base.model_settings  # the same model: its settings and tokenizer record, as the run packed
            model = tm.GPT(cfg).to(device)
            model.load_state_dict(saved["state"])
            bits, blob, quantize_seconds, pack_seconds = tm.export_artifact(
                model, cfg, tm.DistributedTokenLoader(cfg, device), code_bytes, log, {}, math.inf)
            val_bpb = score(cfg, tm.read_artifact(blob)[1])
            row = dict(variant=name, settings=settings, **{f"{c}_bits": b for c, b in bits.items()},
                       model_bytes=len(blob), artifact_bytes=code_bytes + len(blob),
                       status="OK" if code_bytes + len(blob) <= cfg.artifact_limit_bytes else "OVER",
                       val_bpb=val_bpb, gap=val_bpb - pre_export, quantize_seconds=quantize_seconds, pack_seconds=pack_seconds)
            rows.append(row)
            bar.update()
            tqdm.write("sweep " + " ".join(f"{k}:{tm._show(k, v)}" for k, v in row.items() if k != "settings"))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | bits (embed/attn/mlp/experts) | artifact bytes | roundtrip val_bpb | gap | quantize s | pack s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        bits = "/".join(str(r[f"{c}_bits"]) if f"{c}_bits" in r else  # QUANT_FIT chose each block's experts' bits
                        ",".join(str(b) for k, b in r.items() if k.startswith(f"{c}.") and k.endswith("_bits")) or "-"
                        for c in tm.QUANTIZED)
        lines.append(f"| {r['variant']} | {bits} | {r['artifact_bytes']:,} {r['status']} | {r['val_bpb']:.5f} | "
                     f"{r['gap']:+.5f} | {r['quantize_seconds']:.1f} | {r['pack_seconds']:.1f} |")
    return f"pre-export val_bpb {rows[0]['val_bpb']:.5f}\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="artifacts/<RUN_ID>.fp32.pt of a run made with SAVE_FP32=1")
    parser.add_argument("variants", nargs="+", help="NAME:KEY=VALUE [KEY=VALUE ...]")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
        if args.json and (args.json.is_dir() or not args.json.parent.is_dir()):  # found now, not after the sweep
            raise ValueError(f"--json {args.json}: {'is a folder' if args.json.is_dir() else 'its folder does not exist'}")
        if not args.checkpoint.is_file():
            raise ValueError(f"{args.checkpoint}: no such checkpoint")
        rows = sweep(args.checkpoint, variants)
        if args.json:
            tm.write_artifact(args.json, (json.dumps(rows, indent=1) + "\n").encode())  # whole or not at all
    except (ValueError, OSError, tm.ConfigError, tm.RunFailed) as e:
        print(f"error: {e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else f"error: {e}",
              file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
