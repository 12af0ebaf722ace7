"""Null calibration of the verdict layer: false-positive rate and power of every pre-registered hypothesis.

Simulates whole eval iterations (`scorers.simulate`: generation records on the profile's real held-out
corpus rows, response texts the real scorers score) and runs the hypothesis layer on each, exactly as
`score_all` does (`scorers.hypotheses.evaluate_hypotheses`, the profile's hypotheses, alpha, bootstrap
settings). Two null worlds, in which no response knows its row's channel state:

- tied: ABLATED is greedy with channels zeroed, so rows with identical inputs share one response (a
  selection prompt's three rows; a register prompt's + and - rows); MARS, TEXT and STEER are sampled
  per row with the same marginal distribution;
- exchangeable: every arm is sampled from the same prompt distribution.

Both have prompt-level random effects (a prompt's rows move together, per arm), and conflict rows
follow the channel at exactly chance on average, more on some prompts and less on others.

Per hypothesis it prints the family-wise false-positive rate (share of null iterations in which any
member is "supported"; Holm is meant to hold this at alpha) with its Clopper-Pearson 95% interval,
PASS when the interval's lower bound is <= alpha, FAIL when even the lower bound exceeds it (the
exit status is then 1); the rate of a "supported" family verdict; for conflict hypotheses the rate a
naive row-level binomial test would have (rows of a prompt counted as independent). Then the power:
the planted effect is a probability that the hypothesis's arm carries the row's state, tuned per
background so that the effect on the test's own scale equals the pre-registered minimal effect
(`min_effect`, default `tinymars.domain.MIN_EFFECT_DEFAULT`), and the share of iterations whose family
verdict is "supported".

    .venv/bin/python bench/calibration.py                         # smoke profile: 30 prompts per capability/kind
    .venv/bin/python bench/calibration.py --prompts 100 --iterations 1000
    .venv/bin/python bench/calibration.py --iterations 400 --power-iterations 100 --jobs 1   # quick look

`--iterations` counts null iterations in all (half per null world).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from corpus.template_teacher import generate_corpus
from models.eval_arms import select_eval_rows
from scorers import hypotheses as hypothesis_layer
from scorers.evaluate import KINDS
from scorers.hypotheses import evaluate_hypotheses
from scorers.outcomes import METRIC_KIND, row_outcome
from scorers.simulate import ArmModel, simulate_records
from scorers.stats import binom_test, clopper_pearson, holm
from tinymars.domain import CAPABILITIES, CHANCE, effect_scale
from tinymars.profile import Profile, load_profile

BACKGROUNDS = ("tied", "exchangeable")
CALIBRATION_PROMPTS = 3000  # prompts simulated to find the planted effect that meets a minimal effect
CALIBRATION_STEPS = 8  # false-position steps at most on the follow probability
CALIBRATION_TOLERANCE = 0.003  # on the effect's scale


# ---------------------------------------------------------------- the design: rows, hypotheses, arms
@dataclass
class Design:
    rows: list[dict[str, Any]]
    hypotheses: list[dict[str, Any]]
    available: list[tuple[str, str]]
    arms: dict[str, set[str]]  # kind -> arms any hypothesis reads there
    boot_seed: int
    resamples: int
    seed: int
    follow: dict[tuple[str, str], float] = field(default_factory=dict)  # (hypothesis id, background) -> planted


def eval_rows(profile: Profile, prompts: int | None) -> list[dict[str, Any]]:
    """The held-out rows the profile's eval stage would generate on (template teacher, same counts and seed);
    with `prompts`, a corpus large enough to hold out that many prompts per capability and kind."""
    corpus = profile.corpus
    if prompts is None:
        sizes = (corpus.prompts_per_capability, corpus.conflict_prompts_per_capability,
                 profile.eval.max_prompts_per_capability)
    else:
        sizes = (math.ceil(prompts / corpus.heldout_fraction) + 1, prompts, prompts)
    rows, _ = generate_corpus(list(corpus.capabilities), sizes[0], sizes[1], corpus.heldout_fraction, corpus.seed)
    return [rows[i] for i in select_eval_rows(rows, sizes[2])]


def make_design(profile_name: str, prompts: int | None, seed: int, resamples: int | None) -> Design:
    profile = load_profile(profile_name)
    scoring = profile.eval.scoring()
    if not scoring["hypotheses"]:
        raise SystemExit(f"profile {profile_name!r} pre-registers no hypotheses (eval.hypotheses): nothing to "
                         "calibrate; pick a profile that has some, e.g. --profile smoke")
    rows = eval_rows(profile, prompts)
    present = {(r["capability"], r["kind"]) for r in rows}
    available = [(c, k) for c in CAPABILITIES for k in KINDS if (c, k) in present]
    arms: dict[str, set[str]] = {}
    for h in scoring["hypotheses"]:
        arms.setdefault(METRIC_KIND[h["metric"]], set()).update({h["arm"], h["beats"]} - {"chance"})
    return Design(rows, scoring["hypotheses"], available, arms, scoring["bootstrap_seed"],
                  resamples or scoring["bootstrap_resamples"], seed)


def background_arms(background: str, arms: Iterable[str], planted: str | None = None,
                    follow: dict[str, float] | None = None) -> dict[str, ArmModel]:
    """Every arm null (ABLATED tied in the tied world), except `planted`, which carries `follow` per capability."""
    return {arm: ArmModel(follow=follow or {}) if arm == planted
            else ArmModel(tied=background == "tied" and arm == "ablated") for arm in sorted(arms)}


def simulate_null(design: Design, background: str, rng: random.Random) -> list[dict[str, Any]]:
    """A null iteration's records: every kind, the arms any hypothesis reads there."""
    records: list[dict[str, Any]] = []
    for kind in KINDS:
        kind_rows = [r for r in design.rows if r["kind"] == kind]
        if kind_rows and design.arms.get(kind):
            records += simulate_records(kind_rows, background_arms(background, design.arms[kind]), rng)
    return records


def simulate_planted(h: dict[str, Any], rows: list[dict[str, Any]], background: str, follow: dict[str, float],
                     rng: random.Random) -> list[dict[str, Any]]:
    """Records of the hypothesis's kind and its two arms only, its arm carrying the state at `follow`."""
    kind_rows = [r for r in rows if r["kind"] == METRIC_KIND[h["metric"]]]
    arms = {h["arm"], h["beats"]} - {"chance"}
    return simulate_records(kind_rows, background_arms(background, arms, h["arm"], follow), rng)


def plant_key(h: dict[str, Any], background: str) -> tuple[Any, ...]:
    """What the planted effect depends on: hypotheses that differ only in arm names share one search."""
    against = "chance" if h["beats"] == "chance" else \
        "tied" if background == "tied" and h["beats"] == "ablated" else "sampled"
    return h["metric"], against, background, hypothesis_layer.minimal_effect(h)


# ---------------------------------------------------------------- one iteration (runs in a worker)
_DESIGN: Design | None = None


def _init_worker(design: Design) -> None:
    global _DESIGN
    _DESIGN = design


def naive_row_level(records: list[dict[str, Any]], h: dict[str, Any], members: list[str]) -> bool:
    """The row-level test a cluster-blind layer would run on conflict rows: any Holm-significant member."""
    pvalues = []
    for cap in members:
        hits = [row_outcome(r, h["metric"]) for r in records
                if r["capability"] == cap and r["kind"] == "conflict" and r["arm"] == h["arm"]]
        pvalues.append(binom_test(sum(hits), len(hits), CHANCE[h["metric"]], alternative="greater"))
    return any(p < h["alpha"] for p in holm(pvalues))


def null_iteration(task: tuple[str, int]) -> dict[str, Any]:
    """One null iteration of one background: per hypothesis, the verdicts and whether any member is supported
    (and the CPU seconds it took, the speed figure that other load on the machine does not inflate)."""
    background, index = task
    design, cpu = _DESIGN, time.process_time()
    rng = random.Random(f"tinymars-calibration/{design.seed}/null/{background}/{index}")
    records = simulate_null(design, background, rng)
    out = {}
    for h in evaluate_hypotheses(records, design.hypotheses, design.available, design.boot_seed, design.resamples):
        verdicts = [m["verdict"] for m in h["members"]]
        naive = None
        if h["metric"] == "conflict" and h["beats"] == "chance":
            naive = naive_row_level(records, h, [m["capability"] for m in h["members"]])
        out[h["id"]] = {"family": h["verdict"], "any": "supported" in verdicts, "members": verdicts, "naive": naive}
    return {"cpu_s": time.process_time() - cpu, "hypotheses": out}


def effect_at(design: Design, h: dict[str, Any], background: str, follow: float, rows: list[dict[str, Any]],
              cap: str) -> tuple[float, float]:
    """(effect, threshold) the layer measures on a large sample with the planted arm following at `follow`."""
    rng = random.Random(f"tinymars-calibration/{design.seed}/plant/{plant_key(h, background)}")  # common numbers
    records = simulate_planted(h, rows, background, {cap: follow}, rng)
    member = evaluate_hypotheses(records, [{**h, "capability": cap}], [(cap, METRIC_KIND[h["metric"]])],
                                 design.boot_seed, 100)[0]["members"][0]
    return float(member["effect"] if member["effect"] is not None else -math.inf), float(member["threshold"])


def plant(task: tuple[dict[str, Any], str]) -> tuple[tuple[Any, ...], tuple[float, float]]:
    """(plant key, follow probability, effect) at which the hypothesis's effect meets its minimal effect.

    Found by false position (Illinois) on the first member's capability, enlarged to CALIBRATION_PROMPTS
    prompts by repeating its rows under new ids; the latent model is the same for every capability of a kind.
    Follow 0 when the null itself already reaches the minimal effect; 1 when even full following falls short.
    """
    h, background = task
    design = _DESIGN
    kind = METRIC_KIND[h["metric"]]
    cap = _members(design, h)[0]
    base = [r for r in design.rows if r["capability"] == cap and r["kind"] == kind]
    copies = max(1, math.ceil(CALIBRATION_PROMPTS / len({r["prompt_id"] for r in base})))
    rows = [{**r, "prompt_id": f"{r['prompt_id']}~{k}", "row_id": f"{r['row_id']}~{k}"}
            for k in range(copies) for r in base]

    def excess(follow: float) -> tuple[float, float]:
        effect, threshold = effect_at(design, h, background, follow, rows, cap)
        return effect - threshold, effect

    lo, hi = 0.0, 1.0
    (g_lo, e_lo), (g_hi, e_hi) = excess(lo), excess(hi)
    if g_lo >= 0 or g_hi <= 0:
        return plant_key(h, background), (lo, e_lo) if g_lo >= 0 else (hi, e_hi)
    side = 0
    for _ in range(CALIBRATION_STEPS):
        x = hi - g_hi * (hi - lo) / (g_hi - g_lo)
        g, e = excess(x)
        if abs(g) <= CALIBRATION_TOLERANCE:
            break
        if g < 0:
            lo, g_lo = x, g
            g_hi, side = (g_hi / 2.0 if side == -1 else g_hi), -1
        else:
            hi, g_hi = x, g
            g_lo, side = (g_lo / 2.0 if side == 1 else g_lo), 1
    return plant_key(h, background), (x, e)


def _members(design: Design, h: dict[str, Any]) -> list[str]:
    return hypothesis_layer.family_members(h, design.available)


def power_iteration(task: tuple[str, str, int]) -> tuple[str, str, str, list[dict[str, Any]]]:
    """One iteration with the hypothesis's arm planted at its minimal effect: (id, background, family verdict,
    per member its verdict, effect, informative units and the units the layer says 80% power needs)."""
    hid, background, index = task
    design = _DESIGN
    h = next(x for x in design.hypotheses if x["id"] == hid)
    rng = random.Random(f"tinymars-calibration/{design.seed}/power/{hid}/{background}/{index}")
    follow = dict.fromkeys(_members(design, h), design.follow[(hid, background)])
    records = simulate_planted(h, design.rows, background, follow, rng)
    result = evaluate_hypotheses(records, [h], design.available, design.boot_seed, design.resamples)[0]
    members = [{k: m[k] for k in ("verdict", "effect", "n_informative", "n_needed")} for m in result["members"]]
    return hid, background, result["verdict"], members


# ---------------------------------------------------------------- running and printing
def run_pool(fn: Callable, tasks: list, design: Design, jobs: int) -> list:
    if jobs == 1:
        _init_worker(design)
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(design,)) as pool:
        return pool.map(fn, tasks, chunksize=max(1, len(tasks) // (8 * jobs)))


def _ci(k: int, n: int) -> str:
    lo, hi = clopper_pearson(k, n)
    return f"[{lo:.4f}, {hi:.4f}]"


def print_null_table(design: Design, results: dict[str, list[dict[str, Any]]]) -> bool:
    """The null table; True when some family-wise rate is above alpha beyond doubt (lower 95% bound > alpha)."""
    failed = False
    print("\nNULL: family-wise false-positive rate (any member 'supported'), Clopper-Pearson 95% interval; "
          "PASS = lower bound <= alpha; family = rate of a 'supported' family verdict; naive rows = the rate of a "
          "row-level binomial test (rows of a prompt counted as independent), tied / exchangeable")
    head = f"{'hypothesis':<24}{'test':<28}{'m':>2}{'alpha':>7}"
    for background in results:
        head += f"  | {background + ': FWER':<20}{'95% CI':<19}{'family':>7}{'':>5}"
    print(head + "  | naive rows")
    for h in design.hypotheses:
        label = f"{h['metric']} vs {h['beats']} ({h['arm']})"
        line, naive = f"{h['id']:<24}{label:<28}{len(_members(design, h)):>2}{h['alpha']:>7g}", []
        for runs in results.values():
            n = len(runs)
            k = sum(r[h["id"]]["any"] for r in runs)
            fam = sum(r[h["id"]]["family"] == "supported" for r in runs)
            lo, _ = clopper_pearson(k, n)
            verdict = "FAIL" if lo > h["alpha"] else "PASS"
            failed |= verdict == "FAIL"
            line += f"  | {k:>4}/{n:<5} {k / n:<9.4f}{_ci(k, n):<19}{fam / n:>7.4f} {verdict:>4}"
            if runs[0][h["id"]]["naive"] is not None:
                naive.append(f"{sum(r[h['id']]['naive'] for r in runs) / n:.4f}")
        print(line + "  | " + (" / ".join(naive) if naive else "-"))
    pooled = [r for runs in results.values() for r in runs]
    print(f"pooled over both worlds: {len(pooled)} null iterations; any-member FWER per hypothesis: "
          + ", ".join(f"{h['id']} {sum(r[h['id']]['any'] for r in pooled) / len(pooled):.4f}"
                      for h in design.hypotheses))
    return failed


def print_power_table(design: Design, plants: dict[tuple[str, str], tuple[float, float]],
                      power: dict[tuple[str, str], list[tuple[str, list[dict[str, Any]]]]]) -> None:
    print("\nPOWER at the pre-registered minimal effect: the planted arm carries the row's state with probability "
          "p, which puts the effect (on a 3,000-prompt sample) at null + min. power = family 'supported'; "
          "member = share of member tests supported; obs = mean effect the layer measured; n/needed = mean "
          "informative units per member / the layer's a-priori n for 80% member power")
    print(f"{'hypothesis':<24}{'scale':<6}{'target':>7}" + "".join(
        f"  | {b + ': p':<17}{'effect':>7}{'power':>7}{'member':>7}{'obs':>7}{'n/needed':>10}" for b in BACKGROUNDS))
    for h in design.hypotheses:
        scale = effect_scale(h["metric"], h["beats"])
        null = {"share": 0.5, "dz": 0.0}.get(scale, CHANCE.get(h["metric"], 0.0))
        line = f"{h['id']:<24}{scale:<6}{null + hypothesis_layer.minimal_effect(h):>7.3f}"
        for b in BACKGROUNDS:
            follow, effect = plants[(h["id"], b)]
            runs = power[(h["id"], b)]
            members = [m for _, ms in runs for m in ms]
            effects = [m["effect"] for m in members if m["effect"] is not None]
            family = sum(v == "supported" for v, _ in runs) / len(runs)
            member = sum(m["verdict"] == "supported" for m in members) / len(members)
            n_inf = sum(m["n_informative"] for m in members) / len(members)
            needed = members[0]["n_needed"]
            line += (f"  | {follow:<17.3f}{effect:>7.3f}{family:>7.3f}{member:>7.3f}"
                     f"{sum(effects) / max(1, len(effects)):>7.3f}{f'{n_inf:.0f}/{needed}':>10}")
        print(line)


def organ_calibration(iterations: int, prompts: int, alpha: float, margin: float, seed: int) -> bool:
    """The organ verdicts (scorers.organ) and the crosstalk family (scorers.crosstalk) on simulated nulls.

    A prompt's paired difference is a tie with probability 0.3, else +1 / -1 with probability s. Under
    "no difference" (s = 1/2) helps/hurts must be found at most alpha of the time; at the equivalence
    margin's edge (s = 1/2 + margin) "costs nothing" at most alpha; for the crosstalk matrix, 30
    off-diagonal null cells Holm-adjusted as one family: any significant cell at most alpha. Returns
    whether every rate's 95% interval reaches down to alpha or below.
    """
    from scorers.organ import integration_verdict
    from scorers.stats import sign_test_two_sided

    rng = random.Random(seed)

    def draw(share: float) -> tuple[int, int]:
        decided = sum(rng.random() >= 0.3 for _ in range(prompts))
        wins = sum(rng.random() < share for _ in range(decided))
        return wins, decided - wins

    rates = {
        "organ helps/hurts at s = 1/2": sum(integration_verdict(*draw(0.5), alpha, margin)[0] in ("helps", "hurts")
                                            for _ in range(iterations)),
        f"organ costs nothing at s = 1/2 + {margin:g}": sum(
            integration_verdict(*draw(0.5 + margin), alpha, margin)[0] == "costs nothing" for _ in range(iterations)),
        "crosstalk off-diagonal family (30 null cells, Holm)": sum(
            min(holm([sign_test_two_sided(*draw(0.5)) for _ in range(30)])) < alpha for _ in range(iterations)),
    }
    ok = True
    print(f"\norgan and crosstalk verdicts: {iterations} simulated nulls of {prompts} prompts (30% ties), "
          f"alpha {alpha:g}")
    for name, hits in rates.items():
        low, high = clopper_pearson(hits, iterations)
        passed = low <= alpha
        ok &= passed
        print(f"  {name:<52} {hits / iterations:.4f} [{low:.4f}, {high:.4f}]  {'PASS' if passed else 'FAIL'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", help="profile whose corpus sizes and hypotheses are simulated")
    ap.add_argument("--prompts", type=int, default=None,
                    help="held-out prompts per capability and kind (default: as the profile makes them)")
    ap.add_argument("--iterations", type=int, default=2000, help="null iterations in all, half per null world")
    ap.add_argument("--power-iterations", type=int, default=300, help="per hypothesis and world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default: the profile's)")
    ap.add_argument("--organ", action="store_true", help="only the organ and crosstalk verdicts (scorers.organ, "
                    "scorers.crosstalk) on simulated paired nulls, --iterations of --prompts prompts (default 60)")
    args = ap.parse_args()
    if args.organ:
        from tinymars.domain import MIN_EFFECT_DEFAULT

        return 0 if organ_calibration(args.iterations, args.prompts or 60, 0.01, MIN_EFFECT_DEFAULT["share"],
                                      args.seed) else 1
    for name in ("iterations", "power_iterations", "jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.iterations < len(BACKGROUNDS):
        ap.error(f"--iterations must be >= {len(BACKGROUNDS)} (one per null world)")
    if args.prompts is not None and args.prompts < 2:
        ap.error(f"--prompts must be >= 2 held-out prompts per capability and kind, got {args.prompts}")
    design = make_design(args.profile, args.prompts, args.seed, args.resamples)
    prompts = Counter((r["capability"], r["kind"]) for r in design.rows if r["row_id"].endswith(("-a", "-pos")))
    print(f"profile {args.profile}: {len(design.rows)} held-out rows; prompts per capability/kind "
          f"{min(prompts.values())}-{max(prompts.values())}; arms per kind "
          f"{ {k: sorted(v) for k, v in design.arms.items()} }; {len(design.hypotheses)} hypotheses; "
          f"bootstrap {design.resamples}; {args.jobs} job(s)")

    results: dict[str, list[dict[str, Any]]] = {}
    for i, background in enumerate(BACKGROUNDS):
        n = args.iterations // len(BACKGROUNDS) + (i < args.iterations % len(BACKGROUNDS))
        t0 = time.perf_counter()
        done = run_pool(null_iteration, [(background, k) for k in range(n)], design, args.jobs)
        results[background] = [d["hypotheses"] for d in done]
        sec, cpu = time.perf_counter() - t0, sum(d["cpu_s"] for d in done)
        print(f"null world {background:<13} {n} iterations in {sec:.1f} s wall ({args.jobs} job(s)); "
              f"{1000 * cpu / n:.0f} ms CPU per iteration, so 2,000 iterations take {2000 * cpu / n / 60:.1f} CPU "
              f"minutes ({2000 * cpu / n / 120:.1f} min on 2 free cores)", flush=True)
    failed = print_null_table(design, results)

    t0 = time.perf_counter()
    searches = {plant_key(h, b): (h, b) for h in design.hypotheses for b in BACKGROUNDS}
    found = dict(run_pool(plant, list(searches.values()), design, args.jobs))
    plants = {(h["id"], b): found[plant_key(h, b)] for h in design.hypotheses for b in BACKGROUNDS}
    design.follow = {key: follow for key, (follow, _) in plants.items()}
    tasks = [(h["id"], b, k) for h in design.hypotheses for b in BACKGROUNDS for k in range(args.power_iterations)]
    power: dict[tuple[str, str], list[tuple[str, list[dict[str, Any]]]]] = {}
    for hid, b, verdict, members in run_pool(power_iteration, tasks, design, args.jobs):
        power.setdefault((hid, b), []).append((verdict, members))
    print(f"\npower: planted effects found and {len(tasks)} iterations run in {time.perf_counter() - t0:.1f} s")
    print_power_table(design, plants, power)

    seen = Counter(v for runs in results.values() for r in runs for x in r.values() for v in x["members"])
    seen_family = Counter(x["family"] for runs in results.values() for r in runs for x in r.values())
    seen_family.update(v for runs in power.values() for v, _ in runs)
    seen.update(m["verdict"] for runs in power.values() for _, ms in runs for m in ms)
    print(f"\nverdict names seen: members {dict(seen)}; families {dict(seen_family)}")
    print("RESULT:", "FAIL (a false-positive rate exceeds alpha beyond its 95% interval)" if failed else
          "PASS (every family-wise false-positive rate is consistent with <= alpha)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
