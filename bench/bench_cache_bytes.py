"""(c) Bytes per view per field for every heatmap / token encoding, both formats, and what
each encoding does to the values and to each distillation loss term.

    python bench/bench_cache_bytes.py [--quick]

Paper size (K=17, 64x48 heatmaps, D=192, P=256), teacher-like synthetic values
(bench/_common.py: Gaussian blobs on a N(0, 0.003) noise floor, unnormalized tokens).

1. bytes/view: one shard of --views views (the production shard size, 256) written through
   the real writers (zarr, wds) per encoding; sizes from the writer's ShardInfo (what is on
   disk, compressed, container overhead included).
2. value error: max / mean abs error of decode(encode(x)) vs the fp32 teacher output.
3. effect on each loss term: L_SH, L_CS, L_KT, L_VT (unweighted, as in distilpose.losses)
   computed per view against the fp32 teacher fields and against the decoded fields, for
   two student predictions: a random-init distilpose-s forward (early training: large
   terms) and a "near-teacher" prediction (late training: the teacher's own Gaussian fit,
   scores and tokens plus small noise, so the terms are small and the encoding error weighs
   most). Reported: max and mean |L(fp32) - L(decoded)| over views, the same relative to
   the mean term, and the difference on the whole batch's term weighted by its alpha.
   (Only these four terms read teacher fields; L_reg reads ground truth only.)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from types import SimpleNamespace

import _common as C
import numpy as np

NAME = "cache_bytes"
HEATMAP_ENCODINGS = ("i8-thresh", "u8-thresh", "u8-joint-scale", "fp16-thresh", "fp16")
TOKEN_ENCODINGS = ("int8-token-scale", "fp16")
TERMS = ("sh", "cs", "kt", "vt")
TERM_FIELD = {"sh": "heatmaps", "cs": "heatmaps", "kt": "kpt_tokens", "vt": "vis_tokens"}
ALPHA = {"kt": 5e-4, "vt": 5e-4, "sh": 1.0, "cs": 0.01}
DEFAULTS = ("i8-thresh", "int8-token-scale")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128-view shard, 16 views for the loss terms")
    p.add_argument("--views", type=int, help="views in the measured shard (default 256)")
    p.add_argument("--loss-views", type=int, help="views the loss terms are computed on (default 32)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.views = args.views or (128 if args.quick else 256)
    args.loss_views = args.loss_views or (16 if args.quick else 32)
    return args


def combos() -> list[tuple[str, str]]:
    """Every heatmap encoding with the default token encoding, and every token encoding
    with the default heatmap encoding (a field's bytes depend on its own encoding only)."""
    out = [(h, DEFAULTS[1]) for h in HEATMAP_ENCODINGS]
    out += [(DEFAULTS[0], t) for t in TOKEN_ENCODINGS if t != DEFAULTS[1]]
    return out


# ----------------------------------------------------------------------------- 1. bytes


def measure_bytes(rows: dict, tmp: str) -> list[dict]:
    from pipeline.cache import open_writer
    from pipeline.cache.schema import SMALL_FIELDS

    n = len(rows["instance_id"])
    out = []
    for heatmap_encoding, token_encoding in combos():
        spec = C.paper_spec(heatmap_encoding=heatmap_encoding, token_encoding=token_encoding)
        for fmt in ("zarr", "wds"):
            uri = f"{tmp}/bytes-{fmt}-{heatmap_encoding}-{token_encoding}"
            info = open_writer(uri, spec, fmt).write_shard(0, rows)
            sizes = info.bytes_per_field
            small = sum(v for k, v in sizes.items() if k in SMALL_FIELDS or k == "small")
            out.append(
                {
                    "format": fmt,
                    "heatmaps enc": heatmap_encoding,
                    "tokens enc": token_encoding,
                    "heatmaps": sizes.get("heatmaps", 0) / n,
                    "kpt_tokens": sizes.get("kpt_tokens", 0) / n,
                    "vis_tokens": sizes.get("vis_tokens", 0) / n,
                    "small fields": small / n,
                    "overhead": sizes.get("overhead", 0) / n,
                    "total": info.total_bytes / n,
                    "total w/o vis_tokens": (info.total_bytes - sizes.get("vis_tokens", 0)) / n,
                }
            )
    return out


def fp32_reference(spec) -> dict:
    from pipeline.cache.schema import FIELDS, SMALL_FIELDS

    def nbytes(name: str) -> int:
        return int(np.prod(FIELDS[name].shape(spec), dtype=np.int64)) * np.dtype(FIELDS[name].dtype).itemsize

    heat, kpt, vis = nbytes("heatmaps"), nbytes("kpt_tokens"), nbytes("vis_tokens")
    small = sum(nbytes(n) for n in SMALL_FIELDS)
    return {
        "format": "raw fp32",
        "heatmaps enc": "fp32",
        "tokens enc": "fp32",
        "heatmaps": heat,
        "kpt_tokens": kpt,
        "vis_tokens": vis,
        "small fields": small,
        "overhead": 0,
        "total": heat + kpt + vis + small,
        "total w/o vis_tokens": heat + kpt + small,
    }


# ----------------------------------------------------------------------------- 2. values


def measure_value_errors(rows: dict) -> list[dict]:
    from pipeline.cache.encodings import measure_encoding_error

    out = []
    for name, encodings in (("heatmaps", HEATMAP_ENCODINGS), ("kpt_tokens", TOKEN_ENCODINGS)):
        for encoding in encodings:
            fields = (name,) if name == "heatmaps" else ("kpt_tokens", "vis_tokens")
            for field in fields:
                err = measure_encoding_error(field, rows[field], encoding)
                out.append(
                    {
                        "field": field,
                        "encoding": encoding,
                        "max abs err": err.max_abs,
                        "mean abs err": err.mean_abs,
                        "rmse": err.rmse,
                        "max |x|": err.max_abs_fp32,
                        "mean |x|": float(np.abs(rows[field]).mean()),
                    }
                )
    return out


# ----------------------------------------------------------------------------- 3. loss terms


def decoded_teacher(rows: dict, heatmap_encoding: str, token_encoding: str) -> dict:
    from pipeline.cache.encodings import decode_fields, encode_views

    spec = C.paper_spec(heatmap_encoding=heatmap_encoding, token_encoding=token_encoding)
    return decode_fields(encode_views(rows, spec), spec, ["heatmaps", "kpt_tokens", "vis_tokens"])


def predictions(rows: dict) -> dict:
    """Two student outputs for the same views: random-init distilpose-s, and near-teacher."""
    import torch

    from distilpose.models import build_model

    n = len(rows["instance_id"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("distilpose-s").eval()
        with torch.no_grad():
            random_out = model(torch.randn(n, 3, *C.PAPER_INPUT))
    rng = np.random.default_rng(5)
    hh, wh = C.PAPER_SIZES["heatmap_size"]
    gauss = rows["gauss"]
    mu = gauss[..., 0:2] + rng.normal(0, 0.5, gauss[..., 0:2].shape)
    sigma = gauss[..., 2:4] * (1 + rng.normal(0, 0.1, gauss[..., 2:4].shape))

    def noisy(x: np.ndarray, rel: float) -> torch.Tensor:
        return torch.from_numpy((x + rng.normal(0, rel * x.std(), x.shape)).astype(np.float32))

    near = SimpleNamespace(
        coords=torch.from_numpy((mu / np.asarray([wh, hh])).astype(np.float32)),
        sigma=torch.from_numpy(np.maximum(sigma, 0.3).astype(np.float32)),
        score=noisy(rows["confidence"], 0.1),
        kpt_tokens=noisy(rows["kpt_tokens"], 0.1),
        vis_tokens=noisy(rows["vis_tokens"], 0.1),
    )
    return {"random-init distilpose-s": random_out, "near-teacher": near}


def term_values(pred, teacher: dict, weight, rows_slice: slice | None = None) -> dict[str, float]:
    import torch

    from distilpose.losses import loss_cs, loss_kt, loss_sh, loss_vt

    def sl(x):
        return x if rows_slice is None else x[rows_slice]

    t = {k: torch.as_tensor(v) for k, v in teacher.items()}
    return {
        "sh": float(loss_sh(sl(pred.coords), sl(pred.sigma), sl(t["heatmaps"]), sl(weight))),
        "cs": float(loss_cs(sl(pred.score), sl(pred.coords), sl(t["heatmaps"]), sl(weight))),
        "kt": float(loss_kt(sl(pred.kpt_tokens), sl(t["kpt_tokens"]))),
        "vt": float(loss_vt(sl(pred.vis_tokens), sl(t["vis_tokens"]))),
    }


def measure_loss_effect(rows: dict) -> list[dict]:
    import torch

    n = len(rows["instance_id"])
    weight = torch.from_numpy(rows["joint_weights"])
    fp32 = {k: rows[k] for k in ("heatmaps", "kpt_tokens", "vis_tokens")}
    out, seen = [], set()
    for pred_name, pred in predictions(rows).items():
        ref_views = [term_values(pred, fp32, weight, slice(i, i + 1)) for i in range(n)]
        ref_batch = term_values(pred, fp32, weight)
        for heatmap_encoding, token_encoding in combos():
            teacher = decoded_teacher(rows, heatmap_encoding, token_encoding)
            views = [term_values(pred, teacher, weight, slice(i, i + 1)) for i in range(n)]
            batch = term_values(pred, teacher, weight)
            for term in TERMS:
                # A term depends on its own field's encoding only: one row per (term, encoding).
                encoding = heatmap_encoding if TERM_FIELD[term] == "heatmaps" else token_encoding
                if (pred_name, term, encoding) in seen:
                    continue
                seen.add((pred_name, term, encoding))
                diffs = np.abs([v[term] - r[term] for v, r in zip(views, ref_views)])
                mean_term = float(np.mean([abs(r[term]) for r in ref_views]))
                out.append(
                    {
                        "prediction": pred_name,
                        "term": f"L_{term.upper()}",
                        "encoding": encoding,
                        "mean L (fp32)": mean_term,
                        "max |dL| view": float(diffs.max()),
                        "mean |dL| view": float(diffs.mean()),
                        "mean |dL| / L": float(diffs.mean() / mean_term) if mean_term else None,
                        "|dL| batch": abs(batch[term] - ref_batch[term]),
                        "alpha |dL| batch": ALPHA[term] * abs(batch[term] - ref_batch[term]),
                    }
                )
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    C.set_threads(args.threads)
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="cache-bytes-", dir=C.RESULTS_DIR)
    try:
        spec = C.paper_spec()
        rows = C.teacher_like_views(args.views, spec, np.random.default_rng(0))
        print(f"measuring bytes: {len(combos())} encodings x 2 formats, one shard of {args.views} views", flush=True)
        sizes = [fp32_reference(spec), *measure_bytes(rows, tmp)]
        print("measuring value errors", flush=True)
        errors = measure_value_errors(rows)
        print(f"measuring loss terms on {args.loss_views} views", flush=True)
        loss_rows = {k: v[: args.loss_views] for k, v in rows.items()}
        effects = measure_loss_effect(loss_rows)

        lines = [
            f"paper size K=17, 64x48, D=192, P=256; teacher-like synthetic values; {args.views} views in one shard",
            "",
            "1. stored bytes per view per field (compressed, as written by the real writers)",
            C.table(sizes, digits=4),
            "",
            "2. value error of decode(encode(x)) vs fp32 (all views of the shard)",
            C.table(errors),
            "",
            f"3. effect on each loss term (unweighted; per view over {args.loss_views} views; batch = all of them)",
            C.table(effects),
        ]
        text = "\n".join(lines)
        print("\n" + text)
        C.write_results(
            NAME,
            {
                "context": C.context(threads=args.threads, views=args.views, loss_views=args.loss_views),
                "bytes_per_view": sizes,
                "value_errors": errors,
                "loss_effects": effects,
                "report": text,
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
