"""LIDs inside the encoder: all-MiniLM-L6-v2's last block on the text scenario.

    python -m benchmarks.minilm_block run [VARIANT ...]   # baselines and LIDs → results/minilm_block/*.json
    python -m benchmarks.minilm_block report              # → benchmarks/results/minilm_block.md

Each LID variant (:data:`PARTS`; all by default) and the baselines are written to their own JSON file
when they finish, so variants can run in separate processes and a rerun replaces only what it ran.

The text benchmark (``benchmarks.text``) certifies a head on frozen sentence embeddings. Here the
last encoder block is part of the certified model (``examples/text/block.py``: block 6 + mean pooling
+ L2 normalisation + the head, loaded from the Hugging Face weights; blocks 1–5 are frozen and run
once per text). For one seed and one target (the text benchmark's splits and task-1 head, seed 0,
airlines), LIDs at the same τ (Δ = 0.05, balanced accuracy) over:

* the head only (the text benchmark's LID, now through the block);
* the block's feed-forward weights + the head;
* the block's attention weights (query, key, value, output projection) + the head;
* rank-4 LoRA adapters on the feed-forward layers (``le.add_lora``) + the head;

then the same projected fine-tune on the target (Adam, every step projected onto the LID), and
plain fine-tunes of the head and of feed-forward + head for reference. **Arithmetic is float64**:
at float32 the a-priori rounding bound of a 384-wide block (γ_n·|W||x| per product, compounding
through attention and two LayerNorms) is ~500 wide at the feed-forward output even on a zero-width
domain, so a sound float32 certificate of the block is out of reach with these bounds; the
certificates here hold for the model evaluated in float64. Texts are cut at :data:`TOKENS` tokens.
"""

from __future__ import annotations

import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import lid_engine as le
from benchmarks import text as bt
from benchmarks._common import RESULTS, log, machine_header
from benchmarks.cl.training import train_task

SEED, TARGET, DELTA, TOKENS = 0, "airlines", 0.05, 48
TARGET_TRAIN, TARGET_TEST = 1000, 800  # class-stratified subsets of the target's splits
SEARCH = {"iterations": 40, "checkpoints": 3, "batch_size": 64, "finalize_steps": 20}
OUT = RESULTS / "minilm_block"
FINETUNE = {"epochs": 2, "batch_size": 32, "lr": 1e-3}
PARTS = {
    "head only": ["head"],
    "feed-forward + head": ["ffn_in", "ffn_out", "head"],
    "attention + head": ["query", "key", "value", "attn_out", "head"],
    "LoRA (rank 4) on feed-forward + head": None,  # adapters: le.lora_mask plus the head
}


def subset(idx: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    keep = bt.stratified_split(y[idx], [n / len(idx), 1 - n / len(idx)], seed)[0]
    return idx[keep]


def data() -> dict:
    from examples.text import data as td
    from examples.text.block import prefix_states

    s = bt.BenchSettings()
    g_texts, g_y = td.rotten_tomatoes()
    golden = td.golden(groups=False)
    names = ("train", "search", "certification", "test")
    parts = dict(zip(names, bt.stratified_split(g_y, [s.golden_split[n] for n in names], SEED)))
    t_texts, t_y = td.tweets(TARGET)
    test_f = s.target_split["test"]
    look_f = s.target_split["lookahead"] * (1 - test_f)
    t_test, _, t_train = bt.stratified_split(t_y, [test_f, look_f, 1 - test_f - look_f], SEED)
    t_train, t_test = subset(t_train, t_y, TARGET_TRAIN, SEED), subset(t_test, t_y, TARGET_TEST, SEED)

    def states(texts, y, idx):
        return torch.from_numpy(prefix_states([texts[i] for i in idx], TOKENS)).double(), torch.from_numpy(y[idx])

    out = {"golden_train_emb": (torch.from_numpy(golden["x"][parts["train"]]), torch.from_numpy(golden["y"][parts["train"]])),
           "search": states(g_texts, g_y, parts["search"]), "cert": states(g_texts, g_y, parts["certification"]),
           "t1_test": states(g_texts, g_y, parts["test"]), "t2_train": states(t_texts, t_y, t_train),
           "t2_test": states(t_texts, t_y, t_test)}
    return out


def bal(model, xy) -> float:
    with torch.no_grad():
        return le.accuracy(model, *xy, balanced=True)


def finetune(model, d, optimizer_for) -> tuple[torch.nn.Module, float]:
    model = copy.deepcopy(model)
    opt = optimizer_for(model)
    t0 = time.perf_counter()
    x, y = bt.class_balanced(*d["t2_train"], SEED + 1)
    from benchmarks.cl.training import Recipe

    train_task(model, x, y, Recipe(epochs=FINETUNE["epochs"], batch_size=FINETUNE["batch_size"], lr=FINETUNE["lr"],
                                   l2=0.0, unbias=0.0), seed=SEED * 1000 + 1, optimizer=opt)
    return model.eval(), time.perf_counter() - t0


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def save(name: str, doc: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{slug(name)}.json").write_text(json.dumps(doc, indent=1))


def run(variants: list[str]) -> None:
    from examples.text import data as td
    from examples.text.block import from_encoder

    torch.set_num_threads(1)
    s = bt.BenchSettings()
    d = data()
    g = bt.GoldenSplits(d["golden_train_emb"], (d["search"][0][:0], d["search"][1][:0]), d["cert"], d["t1_test"])
    head = bt.task1_head("linear", SEED, s, g, 384)
    _, encoder = td._load_encoder()
    base = from_encoder(encoder, head[0] if isinstance(head, torch.nn.Sequential) else head).double()
    search_bal = bal(base, d["search"])
    tau = le.tau_from_accuracy(search_bal, DELTA)
    unknown = [v for v in variants if v not in PARTS and v != "baselines"]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {['baselines', *PARTS]}")
    out = {"git": bt.git_state(), "machine": machine_header(), "settings": {"seed": SEED, "target": TARGET, "delta": DELTA, "tokens": TOKENS,
           "search": SEARCH, "finetune": FINETUNE, "sizes": {k: len(v[1]) for k, v in d.items()}},
           "before": {"t1_test": bal(base, d["t1_test"]), "t2_test": bal(base, d["t2_test"]), "search": search_bal,
                      "cert": bal(base, d["cert"])}, "tau": tau, "rows": []}
    log(f"before: T1 {out['before']['t1_test']:.3f}, T2 {out['before']['t2_test']:.3f}, τ {tau:.3f}")
    for name, parts in ({} if "baselines" not in variants else {"plain fine-tune, head": ["head"], "plain fine-tune, feed-forward + head": PARTS[
            "feed-forward + head"]}).items():
        frozen = le.width_mask(base, parts)

        def adam(m, frozen=frozen):
            for n, p in m.named_parameters():
                p.requires_grad_(not bool(frozen[n].all()))
            return torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=FINETUNE["lr"])
        model, secs = finetune(base, d, adam)
        out["rows"].append({"method": name, "t1": bal(model, d["t1_test"]), "t2": bal(model, d["t2_test"]),
                            "seconds": secs})
        log(f"{name}: T1 {out['rows'][-1]['t1']:.3f}, T2 {out['rows'][-1]['t2']:.3f}")
    if "baselines" in variants:
        save("baselines", out)
    for name, parts in PARTS.items():
        if name not in variants:
            continue
        model = copy.deepcopy(base)
        if parts is None:
            le.add_lora(model, ["ffn_in", "ffn_out"], rank=4, seed=SEED)
            lora = le.lora_mask(model)
            head_free = le.width_mask(model, ["head"])
            mask = {n: lora[n] & head_free[n] for n in lora}
        else:
            mask = le.width_mask(model, parts)
        free = sum(int((~m).sum()) for m in mask.values())
        t0 = time.perf_counter()
        lid = le.compute_lid(model, *d["search"], tau=tau, cert_x=d["cert"][0], cert_y=d["cert"][1],
                             spec_kind="balanced_accuracy", mask=mask, keep="all", seed=SEED, progress=True, **SEARCH)
        lid_s = time.perf_counter() - t0
        certs = [lid.certificate(i).certified_accuracy for i in range(len(lid))]
        meeting = [i for i, c in enumerate(certs) if c >= tau]
        lid = lid.subset(meeting if meeting else [int(np.argmax(certs))])
        tuned, secs = finetune(model, d, lambda m, lid=lid: le.ProjectedOptimizer(
            torch.optim.Adam(m.parameters(), lr=FINETUNE["lr"]), m, lid, "sample_largest_closest", seed=SEED))
        k = lid.member_index(tuned)
        assert k is not None, "the projected fine-tune left the LID"
        cert = lid.certificate(k).certified_accuracy
        actual = bal(tuned, d["cert"])
        assert cert <= actual + 1e-12, (cert, actual)  # the certificate is a lower bound at the final model
        row = {"method": f"LID: {name}", "free_params": free, "tau": tau, "certified": cert, "meets_tau": bool(meeting),
               "width_sum": lid.members[k].width_sum(), "mean_half_width": lid.members[k].width_sum() / 2 / max(free, 1),
               "lid_seconds": lid_s, "seconds": secs, "t1": bal(tuned, d["t1_test"]), "t2": bal(tuned, d["t2_test"]),
               "t1_cert_split": actual}
        row["nonfinite_steps"] = lid.history[-1].get("nonfinite_steps", 0) if lid.history else 0
        row["prefix_cache"] = lid.search_config.get("prefix_cache")  # where the search cut the fixed prefix off
        log(f"{row['method']}: {free} free params, cert {cert:.3f} (τ {tau:.3f}), width {row['width_sum']:.3g}, "
            f"T1 {row['t1']:.3f}, T2 {row['t2']:.3f}, LID {lid_s:.0f} s")
        save(name, {**out, "rows": [row]})


def report() -> None:
    docs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    base = next(d for d in docs if any("certified" not in r for r in d["rows"]))
    lid_docs = [d for d in docs if all("certified" in r for r in d["rows"])]
    order = ["plain fine-tune, head", "plain fine-tune, feed-forward + head", *[f"LID: {n}" for n in PARTS]]
    rows = sorted(({**r, "commit": d["git"]["commit"][:10]} for d in docs for r in d["rows"]),
                  key=lambda r: order.index(r["method"]))
    commits = sorted({d["git"]["commit"][:10] for d in docs})
    st = base["settings"]
    search = lid_docs[0]["settings"]["search"] if lid_docs else st["search"]
    missing = [n for n in PARTS if f"LID: {n}" not in {r["method"] for r in rows}]
    lines = ["# LIDs inside the encoder: all-MiniLM-L6-v2's last block", "",
             "Generated by `python -m benchmarks.minilm_block report` from `results/minilm_block/*.json` (the module "
             f"docstring has the protocol). Seed {st['seed']}, target {st['target']}, Δ = {st['delta']}, texts cut at "
             f"{st['tokens']} tokens, float64 arithmetic; sizes {st['sizes']}; LID search {search}; fine-tune "
             f"{st['finetune']}. Code at {', '.join(commits)} (the plain fine-tunes ran before the search fixes of "
             "eda1217, which they do not use). Every run shared the 2-CPU machine with test suites or other "
             "benchmarks: the search times are inflated. Rows from code after 23a1e57 search with the frozen prefix "
             "cached (`lid_engine/prefix.py`: the block's part before the first parameter with width runs once per "
             "text; column `cut`). The head-only LID's cut is at the pooled embedding (search 150 s, was 366 s); for "
             "adapters inside the block there is no single cut, because the pooling reads the attention mask from the "
             "model's raw input, so that search still bounds the whole block on every pass.", "",
             f"Before fine-tuning: task-1 balanced accuracy {base['before']['t1_test']:.3f} (test), "
             f"{base['before']['search']:.3f} (search) → τ = {base['tau']:.3f}; task-2 {base['before']['t2_test']:.3f}.", "",
             "| method | parameters with width | certified T1 [τ] | width sum | T1 | T2 | T2 gain over head-only LID | LID search "
             "| cut | code |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    head_t2 = next((r["t2"] for r in rows if r["method"] == "LID: head only"), None)
    for r in rows:
        if "certified" in r:
            cert = f"{r['certified']:.3f} [{r['tau']:.3f}]" + ("" if r["meets_tau"] else " (below τ)")
            cut = r.get("prefix_cache")
            cells = [r["method"], f"{r['free_params']:,}", cert, f"{r['width_sum']:.3g}", f"{r['t1']:.3f}",
                     f"{r['t2']:.3f}", f"{r['t2'] - head_t2:+.3f}" if head_t2 is not None else "", f"{r['lid_seconds']:.0f} s",
                     cut["cut"].split(" at ")[0].replace("at node ", "") if cut else "—", r.get("commit", "")]
        else:
            cells = [r["method"], "—", "—", "—", f"{r['t1']:.3f}", f"{r['t2']:.3f}", "", "—", "—", r.get("commit", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Reading: unconstrained, training the block's feed-forward layers lifts task 2 well beyond the head alone "
              "(by 0.056 over the head's plain fine-tune, at 0.047 of task 1). Inside a certified domain nothing moves: interval bounds over parameter boxes "
              "lose the dependencies that LayerNorm and attention rely on (at a radius of 10⁻⁵ per attention weight "
              "the logit bounds are ~10²¹ wide), so the search's boxes must shrink to widths (sum 0.2–0.5 over up to "
              "1.2M parameters, or zero for attention) at which the projected fine-tune cannot change task 2. Rank-4 "
              "adapters on the feed-forward layers (16k parameters) get a wide box over their factors (width sum 266), "
              "and task 2 does not move either (B starts at zero, so width on A alone changes nothing; this run does "
              "not break the width down by factor). A LID "
              "inside a transformer block needs tighter bounds than IBP: the linear bound on graphs "
              "(`bounds/linear_graph.py`) has no relaxation for LayerNorm, GELU or softmax yet and crosses them "
              "with their IBP intervals, so it does not change this."]
    if missing:
        lines += ["", f"Not run to completion this session: {', '.join(missing)} (its search was still finalising "
                  "when the session ended; `python -m benchmarks.minilm_block run \"VARIANT\"` runs it alone)."]
    (RESULTS / "minilm_block.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2:] or ["baselines", *PARTS])
    elif sys.argv[1:2] == ["report"]:
        report()
        log(f"wrote {RESULTS / 'minilm_block.md'}")
    else:
        raise SystemExit(__doc__)
