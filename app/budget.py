"""The token budget `tinymars validate` prints: vocabulary support, tokens per epoch of each source, epochs.

Computed from the profile alone (corpus.budget), so a vocabulary the corpus cannot support or a run that
would loop over its corpus hundreds of times is seen before the teacher is paid; preflight refuses both.
"""

from __future__ import annotations

from typing import Any

from tinymars.profile import Profile


def budget_lines(prof: Profile, budget: dict[str, Any] | None = None) -> list[str]:
    """Human-readable budget: vocabulary, one line per source, training tokens and epochs."""
    from corpus.budget import token_budget

    b = token_budget(prof) if budget is None else budget
    ok = "ok" if b["vocab_size"] <= b["supportable_pieces"] else "TOO LARGE"
    lines = [f"token budget (estimated from the profile; corpus.budget): vocabulary {b['vocab_size']:,} of about "
             f"{b['supportable_pieces']:,} pieces the text supports ({b['vocab_from']})  {ok}"]
    for name, s in b["sources"].items():
        lines.append(f"  {name:<11} {s['rows']:>7,} train rows  {s['chars']:>11,} chars  ~{s['tokens']:>11,} "
                     "tokens per epoch")
    lines.append(f"  {'epoch':<11} {b['epoch_rows']:>7,} train rows  ~{b['epoch_tokens']:,} tokens "
                 f"(~{b['chars_per_token']} chars per token)")
    t = prof.train
    windows = f"{t.steps:,} steps x {t.batch_size} windows x {prof.pack.seq_len} tokens"
    mark = "ok" if b["epochs"] <= b["max_corpus_epochs"] else "TOO MANY"
    r = b["replay"]
    if r is not None:
        pinned = f"@{r['revision'][:12]}" if r["revision"] else ""
        lines.append(f"  replay      {r['tokens']:>,} tokens from {r['source']}{pinned}; {r['share']:.1%} of "
                     f"{windows} = ~{r['train_tokens']:,} tokens = {r['epochs']:.2f} epochs of the replay tokens")
    how = (f"{1 - (r['share'] if r else 0):.1%} of {windows} x {b['packing_efficiency']} packed" if t.packing
           else f"{t.steps:,} steps x {t.batch_size} rows")
    lines.append(f"  corpus      {how} = ~{b['corpus_tokens']:,} tokens = {b['epochs']:.1f} epochs of the channel "
                 f"corpus (limit train.max_corpus_epochs {b['max_corpus_epochs']:g})  {mark}")
    lines.append(f"  training    ~{b['train_tokens']:,} tokens in all")
    return lines
