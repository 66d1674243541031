"""Data-stage throughput and packing efficiency: our stage and best-fit-decreasing packing vs greedy packing.

One run, one generated corpus (the bundled stdlib docs repeated with seeded variation, as jsonl
files in a temp dir), then:
  1. the whole `data` stage (read -> tokenize -> pack -> write) through Ray Data: wall time per step
     (read off the stage's progress), tokens written, tokens/s and tokens/s per CPU core, packing
     efficiency from stats.json;
  2. the same work piece by piece on one core, in this process, on the same documents: parsing,
     the stage's encode function, unpickling, packing (ours `pack_windows` best-fit decreasing vs
     the greedy baseline `pack_greedy`, at seq_len 4096 and 128) and shard writing;
  3. the tokenizer alone: tiktoken on the bundled BPE as the stage runs it (same ids as HF
     tokenizers, tests/stages/test_fast_bpe.py), and HF tokenizers `encode_batch` (one thread and
     all threads), the library the stage would otherwise use.

    python bench/data_throughput.py --smoke          # tiny corpus, seq_len 128, < 60 s on 2 cores (make test)
    python bench/data_throughput.py                  # default corpus (see --tokens), stage at seq_len 4096
    python bench/data_throughput.py --profile        # also cProfile the stage's driver side (slower stage)

Writes JSON to --out and prints a table. Target the project compares against: >= 1M text tokens/s
per core end to end, >= 99% packing efficiency where greedy packs less.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie import get_preset  # noqa: E402
from pipeline.contract import Progress, StageContext  # noqa: E402
from pipeline.formats import TOKENIZER_FILE  # noqa: E402
from pipeline.shards import ShardWriter  # noqa: E402
from stages.data import Config  # noqa: E402
from stages.data import run as run_stage  # noqa: E402
from stages.data.config import SourceConfig  # noqa: E402
from stages.data.encode import EncodeSpec, encode_batch, table_documents  # noqa: E402
from stages.data.fast_bpe import fast_encoder  # noqa: E402
from stages.data.packing import pack_best_fit, pack_greedy  # noqa: E402
from stages.data.sources import RawRecord, parse_file  # noqa: E402
from stages.data.stdlib_corpus import stdlib_documents  # noqa: E402
from stages.data.tokenizer import train_tokenizer  # noqa: E402

TARGET_TOKENS_PER_S_PER_CORE = 1_000_000
TARGET_PACKING_EFFICIENCY = 0.99
PACK_SEQ_LENS = (4096, 128)
"""ERNIE 4.5's pretraining length and the tiny presets' length."""
ENCODE_BATCH = 64
"""Rows per `encode_batch` call, as `stages.data.dataflow` asks Ray Data for."""
TOKENIZE_BATCH = 1024
"""Texts per HF `encode_batch` call in the tokenizer-only figure (64 or all at once differ by < 10%)."""
PROFILE_POINTS = {
    "bundled corpus + post-training sets": ("", ("bundled_corpus", "write_jsonl")),
    "tokenizer: sample texts (Ray read)": ("dataflow.py", ("sample_texts",)),
    "tokenizer: BPE training": ("tokenizer.py", ("train_tokenizer",)),
    "read + parse + encode (Ray, materialize)": ("dataflow.py", ("encoded_dataset",)),
    "scan encoded rows": ("dataflow.py", ("scan",)),
    "iterate docs (Ray iter_batches + Arrow -> documents)": ("dataflow.py", ("documents",)),
    "mixture interleave (incl. iterate)": ("mixture.py", ("interleave",)),
    "stats per document": ("stats.py", ("add_document",)),
    "window flush (pack + write + stats + save)": ("stage.py", ("flush",)),
    "  pack": ("packing.py", ("pack_window",)),
    "  shard write": ("shards.py", ("write", "close")),
    "  progress save": ("stage.py", ("save",)),
    "stats.json + figures": ("stats.py", ("to_dict", "stats_figures")),
}
"""Driver-side functions whose cumulative time the profile reports: (file suffix, function names)."""


# ---------------------------------------------------------------------- corpus
def chars_per_token(vocab_size: int) -> float:
    """Estimated from a BPE of the stage's size trained on the base documents (sizes the corpus only)."""
    base = stdlib_documents()
    tokenizer = train_tokenizer(base, vocab_size)
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(base, add_special_tokens=False))
    return sum(map(len, base)) / tokens


def varied_document(base: list[str], rng: random.Random) -> str:
    """1-6 random base documents, sentences shuffled half the time, under a random id line.

    The id and the shuffles keep repeats from being byte-identical; joining documents widens the
    length spread (the packer's job) beyond the docstrings' own.
    """
    parts = [f"[doc {rng.getrandbits(40):010x}]"]
    for _ in range(min(1 + int(rng.expovariate(0.7)), 6)):
        text = rng.choice(base)
        if rng.random() < 0.5:
            sentences = text.split(". ")
            rng.shuffle(sentences)
            text = ". ".join(sentences)
        parts.append(text)
    return "\n\n".join(parts)


def write_corpus(directory: Path, target_tokens: int, files: int, seed: int, ratio: float) -> dict:
    """`files` jsonl files of {"text": ...} holding about `target_tokens` tokens (at `ratio` chars per token)."""
    base, rng = stdlib_documents(), random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    handles = [open(directory / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    chars = documents = 0
    while chars < target_tokens * ratio:
        text = varied_document(base, rng)
        handles[documents % files].write(json.dumps({"text": text}) + "\n")
        chars, documents = chars + len(text), documents + 1
    for handle in handles:
        handle.close()
    size = sum(p.stat().st_size for p in directory.iterdir())
    return {"files": files, "documents": documents, "chars": chars, "bytes": size, "base_documents": len(base)}


# ---------------------------------------------------------------------- whole stage
def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all below it (Ray's GCS, raylet and workers).

    Robust to other load on a shared machine, unlike wall time; a worker that exits mid-step takes
    its seconds with it, so this can only undercount.
    """
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class StepClock(Progress):
    """The stage's progress, plus wall and CPU time at each step's end (the stage advances `done` once per step)."""

    def set_total(self, total: int, message: str = "") -> None:
        super().set_total(total, message)
        self.marks = [(time.perf_counter(), cpu_seconds(), message)]

    def update(self, n: int = 1, message: str | None = None) -> None:
        super().update(n, message)
        if n:
            self.marks.append((time.perf_counter(), cpu_seconds(), message))

    def steps(self) -> dict[str, dict]:
        return {
            name: {"wall_s": round(t1 - t0, 3), "cpu_s": round(c1 - c0, 3)}
            for (t0, c0, name), (t1, c1, _) in zip(self.marks, self.marks[1:], strict=False)
        }


def stage_config(corpus: Path, args) -> Config:
    return Config(
        sources=[SourceConfig(name="text", kind="jsonl", path=str(corpus), weight=1)],
        seq_len=args.stage_seq_len,
        vocab_size=args.vocab_size,
        window_rows=args.window_rows,
    )


def run_whole_stage(config: Config, out_dir: Path, profile_path: Path | None) -> dict:
    model = get_preset("tiny_dense").replace(vocab_size=config.vocab_size)
    clock = StepClock()
    ctx = StageContext("data", config, model, {}, out_dir, progress=clock, seed=0)
    profiler = cProfile.Profile() if profile_path else None
    load_before, cpu_before, start = os.getloadavg(), cpu_seconds(), time.perf_counter()
    if profiler:
        profiler.enable()
    run_stage(ctx)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    stats = json.loads((out_dir / "stats.json").read_text())
    steps = clock.steps()
    record = {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "steps": steps,
        "wall_s_without_tokenizer_step": round(wall - steps["tokenizer"]["wall_s"], 3),
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "rows": stats["rows"],
        "seq_len": stats["seq_len"],
        "packing_efficiency": round(stats["packing_efficiency"], 5),
        "tokens_per_s": round(stats["tokens"] / wall),
        "tokens_per_cpu_s": round(stats["tokens"] / cpu),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "profiled": profiler is not None,
    }
    if profiler:
        profiler.dump_stats(profile_path)
        record["profile"] = profile_summary(pstats.Stats(profiler))
    return record


def measure_stage(config: Config, out_dir: Path, corpus_bytes: int, profile_path: Path | None) -> dict:
    """The whole-stage record with per-core rates (Ray is started first, its start-up timed apart)."""
    from stages.training.launch import ensure_ray

    _, ray_init_s = timed(ensure_ray)
    stage = run_whole_stage(config, out_dir, profile_path)
    cores, cores_from = ray_cores()
    return stage | {
        "cores": cores,
        "cores_from": cores_from,
        "ray_init_s": round(ray_init_s, 3),
        "tokens_per_s_per_core": round(stage["tokens_per_s"] / cores),
        "tokens_per_s_per_core_without_tokenizer_step": round(
            stage["tokens"] / stage["wall_s_without_tokenizer_step"] / cores
        ),
        "bytes_per_s_per_core": round(corpus_bytes / stage["wall_s"] / cores),
    }


def ray_cores() -> tuple[float, str]:
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU"):
        return ray.cluster_resources()["CPU"], 'ray.cluster_resources()["CPU"]'
    return float(os.cpu_count() or 1), "os.cpu_count()"


def profile_summary(stats: pstats.Stats, top: int = 20) -> dict:
    """Cumulative seconds of the PROFILE_POINTS, and the `top` functions by own time."""
    points = {}
    for label, (suffix, names) in PROFILE_POINTS.items():
        hits = [v for (f, _, n), v in stats.stats.items() if n in names and f.endswith(suffix)]
        points[label] = round(sum(v[3] for v in hits), 3) if hits else None
    by_own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    own = [
        {"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "own_s": round(v[2], 3), "cum_s": round(v[3], 3)}
        for (f, line, name), v in by_own
    ]
    return {"cumulative_s": points, "top_own_time": own, "total_s": round(stats.total_tt, 3)}


# ---------------------------------------------------------------------- pieces on one core
def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def parse_corpus(corpus: Path, source: SourceConfig) -> list[dict]:
    """Raw-record rows of every file, as the stage's Ray read tasks make them."""
    return [r.to_row() for path in sorted(corpus.iterdir()) for r in parse_file(source, str(path), path.read_bytes())]


def encode_rows(rows: list[dict], spec: EncodeSpec) -> list:
    """The stage's `encode_batch` over batches of ENCODE_BATCH rows; the Arrow tables it returns."""
    tables = []
    for at in range(0, len(rows), ENCODE_BATCH):
        batch = rows[at : at + ENCODE_BATCH]
        tables.append(encode_batch({k: [r[k] for r in batch] for k in batch[0]}, spec))
    return tables


def read_documents(tables: list) -> list:
    """The stage process's side: encoded tables -> PackDocuments (numpy views for text)."""
    docs = [doc for table in tables for _, (_, doc) in table_documents(table)]
    for doc_id, doc in enumerate(docs):  # the stage numbers documents in stream order
        doc.doc_id = doc_id
    return docs


def single_thread_tokenizers(enabled: bool) -> None:
    """HF tokenizers reads TOKENIZERS_PARALLELISM at every `encode_batch`."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if enabled else "true"


def tokenizer_only(tokenizer_json: str, texts: list[str], library: str, threads_one: bool = True) -> dict:
    """Token ids alone: HF tokenizers `encode_batch` (the library), or tiktoken as the stage runs it."""
    if library == "tiktoken":
        encode = fast_encoder(tokenizer_json)
        if encode is None:
            raise SystemExit("the stage's tokenizer is not the bundled closed BPE; tiktoken does not apply")
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json)
        single_thread_tokenizers(threads_one)

        def encode(batch):
            return [e.ids for e in tokenizer.encode_batch(batch, False)]

    tokens, start = 0, time.perf_counter()
    for at in range(0, len(texts), TOKENIZE_BATCH):
        tokens += sum(len(ids) for ids in encode(texts[at : at + TOKENIZE_BATCH]))
    seconds = time.perf_counter() - start
    single_thread_tokenizers(True)
    return {
        "library": library,
        "threads": 1 if threads_one else "all",
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds),
    }


def bench_packer(name: str, docs: list, seq_len: int, window_rows: int, keep_rows: bool) -> tuple[dict, list]:
    """Rows, efficiency (real tokens / slots) and speed of one packer over `docs`."""
    if name == "bfd":
        stream = pack_best_fit(docs, seq_len, window_tokens=window_rows * seq_len)
    else:
        stream = pack_greedy(docs, seq_len)
    kept, rows, real = [], 0, 0
    start = time.perf_counter()
    for row in stream:
        rows += 1
        real += int((row["document_ids"] >= 0).sum())
        if keep_rows:
            kept.append(row)
    seconds = time.perf_counter() - start
    record = {
        "packer": "ours: pack_windows (best-fit decreasing)" if name == "bfd" else "baseline: pack_greedy",
        "seq_len": seq_len,
        "window_rows": window_rows if name == "bfd" else None,
        "documents": len(docs),
        "tokens": real,
        "rows": rows,
        "efficiency": round(real / (rows * seq_len), 5),
        "seconds": round(seconds, 3),
        "documents_per_s": round(len(docs) / seconds),
        "tokens_per_s": round(real / seconds),
    }
    return record, kept


def write_rows(rows: list, directory: Path, rows_per_shard: int) -> None:
    with ShardWriter(str(directory), rows_per_shard) as writer:
        for row in rows:
            writer.write(row)


def rate(name: str, seconds: float, tokens: int) -> dict:
    return {"step": name, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds) if seconds else None}


def run_pieces(corpus: Path, stage_out: Path, config: Config, model, scratch: Path) -> dict:
    """Every step of the stage again, one core, in this process, on the stage's corpus and tokenizer."""
    tokenizer_json = (stage_out / TOKENIZER_FILE).read_text()
    spec = EncodeSpec.build(
        tokenizer_json, model, config.image.min_pixels, config.image.max_pixels, config.val_fraction
    )
    single_thread_tokenizers(True)
    rows, parse_s = timed(parse_corpus, corpus, config.sources[0])
    tables, encode_s = timed(encode_rows, rows, spec)
    docs, read_s = timed(read_documents, tables)
    tokens = sum(len(d.tokens) for d in docs)
    texts = [RawRecord.from_row(r).segments[0][1] for r in rows if r["payload"]]
    tokenizer = [
        tokenizer_only(tokenizer_json, texts, "tiktoken"),
        tokenizer_only(tokenizer_json, texts, "HF tokenizers", threads_one=True),
        tokenizer_only(tokenizer_json, texts, "HF tokenizers", threads_one=False),
    ]
    packing, stage_rows = [], []
    for seq_len in PACK_SEQ_LENS:
        for name in ("bfd", "greedy"):
            keep = name == "bfd" and seq_len == config.seq_len
            record, kept = bench_packer(name, docs, seq_len, config.window_rows, keep)
            packing.append(record)
            stage_rows = kept if keep else stage_rows
    if not stage_rows:  # a --stage-seq-len outside PACK_SEQ_LENS
        stage_rows = bench_packer("bfd", docs, config.seq_len, config.window_rows, True)[1]
    _, write_s = timed(write_rows, stage_rows, scratch / "shards", config.rows_per_shard)
    steps = [
        rate("parse jsonl (sources.parse_file)", parse_s, tokens),
        rate("encode (encode.encode_batch, 1 thread)", encode_s, tokens),
        rate("encoded rows -> documents (driver)", read_s, tokens),
        rate(f"shard write at seq_len {config.seq_len} (ShardWriter)", write_s, tokens),
    ]
    return {"documents": len(docs), "tokens": tokens, "steps": steps, "tokenizer": tokenizer, "packing": packing}


# ---------------------------------------------------------------------- report
def device() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "os_cpu_count": os.cpu_count(), "platform": platform.platform()}


def versions() -> dict:
    import numpy
    import pyarrow
    import ray
    import tiktoken
    import tokenizers

    return {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
    }


def verdict(stage: dict, packing: list[dict]) -> dict:
    pairs = {}
    for r in packing:
        pairs.setdefault(r["seq_len"], {})["bfd" if r["window_rows"] else "greedy"] = r["efficiency"]
    return {
        "tokens_per_s_per_core": {
            "target": TARGET_TOKENS_PER_S_PER_CORE,
            "measured": stage["tokens_per_s_per_core"],
            "met": stage["tokens_per_s_per_core"] >= TARGET_TOKENS_PER_S_PER_CORE,
        },
        "packing_efficiency": {
            str(seq): {
                "target": TARGET_PACKING_EFFICIENCY,
                **p,
                "met": p["bfd"] >= TARGET_PACKING_EFFICIENCY and p["bfd"] >= p["greedy"],
            }
            for seq, p in pairs.items()
        },
    }


def print_table(report: dict) -> None:
    stage = report["stage"]
    print(
        f"\nwhole stage ({stage['cores']:g} cores, {stage['cores_from']}): {stage['tokens']:,} tokens in "
        f"{stage['wall_s']:.1f} s = {stage['tokens_per_s']:,} tokens/s = {stage['tokens_per_s_per_core']:,} "
        f"tokens/s/core; packed {stage['packing_efficiency']:.2%} at seq_len {stage['seq_len']}"
    )
    print(
        f"  {stage['cpu_s']:.1f} CPU s (this process + Ray) = {stage['tokens_per_cpu_s']:,} tokens per CPU s; "
        f"without the tokenizer step {stage['tokens_per_s_per_core_without_tokenizer_step']:,} tokens/s/core; "
        f"load average {stage['load_average_1min']}"
    )
    print(f"  {'step':28s} {'wall s':>9s} {'CPU s':>9s}")
    for name, step in stage["steps"].items():
        print(f"  {name:28s} {step['wall_s']:9.2f} {step['cpu_s']:9.2f}")
    print(f"\n{'one core, in process':48s} {'seconds':>9s} {'tokens/s':>12s}")
    for step in report["pieces"]["steps"]:
        print(f"{step['step']:48s} {step['seconds']:9.2f} {step['tokens_per_s']:12,}")
    for tok in report["pieces"]["tokenizer"]:
        print(
            f"{tok['library'] + ' alone, threads=' + str(tok['threads']):48s} {tok['seconds']:9.2f} "
            f"{tok['tokens_per_s']:12,}"
        )
    print(f"\n{'packer':42s} {'seq':>5s} {'rows':>8s} {'effic.':>8s} {'docs/s':>10s} {'tokens/s':>12s}")
    for r in report["pieces"]["packing"]:
        print(
            f"{r['packer']:42s} {r['seq_len']:5d} {r['rows']:8,} {r['efficiency']:8.2%} "
            f"{r['documents_per_s']:10,} {r['tokens_per_s']:12,}"
        )
    if "profile" in stage:
        print("\ndriver profile (cumulative s)")
        for label, seconds in stage["profile"]["cumulative_s"].items():
            print(f"  {label:44s} {'-' if seconds is None else f'{seconds:9.2f}'}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny corpus, stage at seq_len 128 (< 60 s on 2 cores)")
    parser.add_argument("--tokens", type=float, default=20e6, help="corpus size in tokens (estimated before the run)")
    parser.add_argument("--files", type=int, default=16, help="jsonl files the corpus is split across")
    parser.add_argument("--stage-seq-len", type=int, default=4096, help="data.seq_len of the whole-stage run")
    parser.add_argument("--vocab-size", type=int, default=1024, help="data.vocab_size (the stage trains this BPE)")
    parser.add_argument("--window-rows", type=int, default=256, help="data.window_rows (BFD window)")
    parser.add_argument("--seed", type=int, default=0, help="corpus variation seed")
    parser.add_argument("--profile", action="store_true", help="cProfile the stage's driver side (slows the stage)")
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.files, args.stage_seq_len = 200_000, 4, 128

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="data_throughput-") as tmp:
        scratch = Path(tmp)
        ratio = chars_per_token(args.vocab_size)
        corpus = write_corpus(scratch / "corpus", int(args.tokens), args.files, args.seed, ratio)
        corpus |= {"target_tokens": int(args.tokens), "estimated_chars_per_token": round(ratio, 3)}
        config = stage_config(scratch / "corpus", args)
        profile_path = out.with_suffix(".prof") if args.profile else None
        stage = measure_stage(config, scratch / "dataset", corpus["bytes"], profile_path)
        model = get_preset("tiny_dense").replace(vocab_size=config.vocab_size)
        pieces = run_pieces(scratch / "corpus", scratch / "dataset", config, model, scratch)
    report = {
        "bench": "data_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device(),
        "versions": versions(),
        "config": {"args": vars(args), "stage": asdict(config) | {"sources": [asdict(s) for s in config.sources]}},
        "corpus": corpus,
        "stage": stage,
        "pieces": pieces,
        "targets": verdict(stage, pieces["packing"]),
    }
    report["config"]["stage"]["sources"][0]["path"] = "<temp dir>/corpus"
    print_table(report)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}" + (f" and {profile_path}" if profile_path else ""))
    return report


if __name__ == "__main__":
    main()
