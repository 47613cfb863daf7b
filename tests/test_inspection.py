"""The logit lens and attention weights of refimpl/inspection.py against Hugging Face transformers.

The golden files golden/inspection/*.json were made by golden/make_golden_inspection.py
(transformers, torch, CPU, float32, eager attention, output_attentions and output_hidden_states);
regenerate them with `make golden`, never by hand. One is the default model on a chat-templated
conversation, a few (layer, head) pairs; the others are the tiny models of every family on a
random prompt longer than their sliding windows, every (layer, head) pair.

Besides transformers' numbers: layer L of the lens is the forward pass's own distribution, the
probe leaves the forward pass bit for bit alone, narrowing `positions` changes nothing of the rows
kept, `request` refuses what is too large with a message that says how to narrow it, and the
whole inspection runs in the strict Array API namespace.
"""

from dataclasses import dataclass

import array_api_strict
import numpy as np
import pytest

from refimpl import inspection
from refimpl.models import forward, load_config, load_model
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

from conftest import GOLDEN, NEAR_TIE, load_golden

TOLERANCE = 1e-4  # max |Δ| of an attention weight or a logprob, as test_model_golden's
ENTROPY_TOLERANCE = 1e-3  # nats
ROW_SUM_TOLERANCE = 1e-5  # |sum of an attention row - 1|
STRICT_TOLERANCE = 1e-5  # array_api_strict against NumPy (the same NumPy underneath)
DEFAULT = "smollm2-135m-instruct"
NAMES = sorted(p.stem for p in (GOLDEN / "inspection").glob("*.json"))
TINY = [name for name in NAMES if name != DEFAULT]
TOP = 5


def model_path(golden):
    """The model a golden file was made from: the default model (pulled into the cache), or golden/tiny/<name>."""
    if golden["model"] == "SmolLM2-135M-Instruct":
        from refimpl.pull import pull

        return pull()
    return GOLDEN / golden["model"]


def golden_request(model, golden, **kwargs):
    """The request that covers a golden file: every position, the lens with TOP candidates, and
    the (layer, head) pairs it holds (every pair of a tiny model, a grid of the default model's)."""
    layers = sorted({a["layer"] for a in golden["attention"]})
    heads = sorted({a["head"] for a in golden["attention"]})
    assert len(layers) * len(heads) == len(golden["attention"]), "the golden pairs are not a grid"
    return inspection.request(model.config, len(golden["input_ids"]), top=TOP, layers=layers, heads=heads, **kwargs)


@dataclass
class Subject:
    golden: dict
    model: object
    r: inspection.Inspection  # the inspection of the golden prompt (golden_request)
    plain: np.ndarray  # [T, V] the logits of one plain forward pass over it, no probe


@pytest.fixture(scope="module")
def inspected():
    """name -> Subject, each computed once per module: the default model's inspection takes
    seconds (31 layers x 53 positions through a 49,152-token output head)."""
    done = {}

    def get(name):
        if name not in done:
            golden = load_golden(f"inspection/{name}.json")
            model = load_model(model_path(golden))
            ids = golden["input_ids"]
            plain = to_numpy(forward(model, [list(ids)], [model.new_cache(len(ids))], all_logits=True))
            done[name] = Subject(golden, model, inspection.inspect(model, ids, golden_request(model, golden)), plain)
        return done[name]

    return get


def assert_within(ours, theirs, tolerance, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape}, transformers {theirs.shape}"
    diff = np.abs(ours - theirs)
    if diff.size and diff.max() > tolerance:
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        pytest.fail(f"{what}: max |Δ| = {diff.max():.3g} > {tolerance} at {worst} (ours {ours[worst]:.7g}, "
                    f"transformers {theirs[worst]:.7g}); if transformers legitimately changed, run `make golden`")


# ---------------------------------------------------------------- what the golden files cover


def test_golden_files_cover_every_family_and_window():
    assert DEFAULT in NAMES, "golden/inspection/smollm2-135m-instruct.json is missing: run `make golden`"
    types = set()
    for name in TINY:
        golden = load_golden(f"inspection/{name}.json")
        config = load_config(GOLDEN / golden["model"])
        types.add(config.model_type)
        L, H, T = config.num_hidden_layers, config.num_attention_heads, len(golden["input_ids"])
        assert len(golden["attention"]) == L * H, f"{name}: not every (layer, head) pair"
        window = getattr(config, "sliding_window", None)
        zeros = sum(w == 0 for a in golden["attention"] for row in a["rows"] for w in row)
        if window:  # the prompt outruns the window, so windowed rows hold zeros to check
            assert T > window and zeros > 0, f"{name}: window {window}, {T} tokens, {zeros} zero weights"
        assert np.shape(golden["lens"]["top_ids"]) == (T, L + 1, TOP + 1)
    assert {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text", "gpt2",
            "olmo2", "phi3"} <= types, types
    default = load_golden(f"inspection/{DEFAULT}.json")
    assert 40 <= len(default["input_ids"]) <= 60 and default["messages"]
    assert np.shape(default["lens"]["top_ids"])[:2] == (len(default["input_ids"]), default["num_hidden_layers"] + 1)


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", NAMES)
def test_attention_weights_match_transformers(inspected, name):
    s = inspected(name)
    golden, r = s.golden, s.r
    assert r.positions == list(range(len(golden["input_ids"])))
    for pair in golden["attention"]:
        layer, head = pair["layer"], pair["head"]
        ours = r.attention[(layer, head)]
        what = f"{name} layer {layer} head {head}"
        assert [len(row) for row in ours] == [t + 1 for t in range(len(ours))], f"{what}: row t must hold t + 1 weights"
        for t, (mine, theirs) in enumerate(zip(ours, pair["rows"], strict=True)):
            mine, theirs = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
            assert_within(mine, theirs, TOLERANCE, f"{what} row {t}")
            assert abs(mine.sum() - 1) <= ROW_SUM_TOLERANCE, f"{what} row {t} sums to {mine.sum():.8f}"
            # Outside a sliding window transformers' weights are exactly 0, and only there.
            np.testing.assert_array_equal(mine == 0, theirs == 0, err_msg=f"{what} row {t}: zero weights differ")


def clear_slots(top_logprobs):
    """Which of the TOP candidate slots are clearly apart from both neighbours (TOP + 1 logprobs,
    descending): only there must two code paths put the same id."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    above = np.concatenate([[np.inf], top[:-1] - top[1:]])  # gap to the slot before
    return (above[:TOP] > NEAR_TIE) & (top[:TOP] - top[1:TOP + 1] > NEAR_TIE)


@pytest.mark.parametrize("name", NAMES)
def test_logit_lens_matches_transformers(inspected, name):
    """Every layer l = 0..L at every position: the residual stream entering block l (transformers'
    hidden_states[l]) through the final norm and the output head; layer L is the model's output."""
    s = inspected(name)
    golden, model, r = s.golden, s.model, s.r
    lens, ids = golden["lens"], golden["input_ids"]
    T, L = len(ids), model.config.num_hidden_layers
    assert len(r.lens) == T and all(len(row) == L + 1 for row in r.lens)
    compared = skipped = 0
    for t in range(T):
        for layer in range(L + 1):
            row, where = r.lens[t][layer], f"{name} position {t} layer {layer}"
            assert_within([lp for _, lp in row.top], lens["top_logprobs"][t][layer][:TOP], TOLERANCE,
                          f"{where} top logprobs")
            ids_ours, ids_theirs = np.array([i for i, _ in row.top]), np.array(lens["top_ids"][t][layer][:TOP])
            clear = clear_slots(lens["top_logprobs"][t][layer])
            np.testing.assert_array_equal(ids_ours[clear], ids_theirs[clear], err_msg=f"{where}: top ids")
            assert abs(row.entropy - lens["entropy"][t][layer]) <= ENTROPY_TOLERANCE, (
                f"{where}: entropy {row.entropy:.6f}, transformers {lens['entropy'][t][layer]:.6f}")
            if t + 1 == T:
                assert row.next_rank is None and row.next_logprob is None, f"{where}: nothing comes after the end"
                continue
            assert_within(row.next_logprob, lens["next_logprob"][t][layer], TOLERANCE, f"{where} next-token logprob")
            if lens["next_gap"][t][layer] > NEAR_TIE:  # else a neighbour is a near-tie: either rank is right
                assert row.next_rank == lens["next_rank"][t][layer], (
                    f"{where}: next token ranked {row.next_rank}, by transformers {lens['next_rank'][t][layer]}")
                compared += 1
            else:
                skipped += 1
    # A 49,152-token vocabulary crowds the ranks of unlikely tokens: 15% of the default model's are near-ties.
    assert skipped <= 0.25 * (compared + skipped), f"{name}: {skipped} of {compared + skipped} ranks are near-ties"


# ---------------------------------------------------------------- against refimpl's own forward pass


@pytest.mark.parametrize("name", NAMES)
def test_last_layer_of_the_lens_is_the_forward_pass(inspected, name):
    """Layer L holds the very numbers of `logprobs` and of a plain forward pass's log_softmax."""
    s = inspected(name)
    golden, model, r = s.golden, s.model, s.r
    ids, L = golden["input_ids"], model.config.num_hidden_layers
    plain = to_numpy(log_softmax(model.xp, model.xp.asarray(s.plain)))  # [T, V]
    assert r.logprobs[0] is None
    assert r.logprobs[1:] == [float(plain[t - 1, ids[t]]) for t in range(1, len(ids))]
    for i, p in enumerate(r.positions):
        row = r.lens[i][L]
        best = np.argsort(-plain[p], kind="stable")[:TOP]  # ties to the lower id
        assert row.top == [(int(j), float(plain[p, j])) for j in best], f"{name} position {p}"
        if p + 1 < len(ids):
            assert row.next_logprob == r.logprobs[p + 1]
            assert row.next_rank == int(np.sum(plain[p] > plain[p, ids[p + 1]])) + 1


@pytest.mark.parametrize("name", NAMES)
def test_the_probe_leaves_the_forward_pass_alone(inspected, name):
    """With a probe keeping every residual and every head, the logits are bit for bit a plain pass's."""
    s = inspected(name)
    golden, model = s.golden, s.model
    ids, L = golden["input_ids"], model.config.num_hidden_layers
    asked = inspection.request(model.config, len(ids), top=TOP, layers="all", heads="all")
    cache = model.new_cache(len(ids))
    cache.probe = inspection.Probe(model.xp, asked)
    probed = to_numpy(forward(model, [list(ids)], [cache], all_logits=True))
    # The probe did keep what it was asked for (the residual entering every block and after the last, every head).
    for layer in range(L + 1):
        assert cache.probe.residual_rows(layer, [0, len(ids) - 1]).shape == (2, model.config.hidden_size)
    for layer, head in asked.pairs:
        assert len(cache.probe.attention_rows(layer, head, asked.positions)) == len(ids)
    plain = s.plain
    assert probed.dtype == plain.dtype and probed.shape == plain.shape
    assert np.array_equal(probed.view(np.uint32), plain.view(np.uint32)), (
        f"{name}: the probe moved the logits by up to {np.abs(probed - plain).max():.3g}")


@pytest.mark.parametrize("name", [DEFAULT, "gemma2-tiny", "mistral-sliding-window", "qwen3-moe-tiny"])
def test_narrowing_positions_keeps_the_rows(inspected, name):
    """Asking for some positions gives those positions' rows of the full inspection: the attention
    rows and layer L exactly; the other layers' rows go through the output head in a product of
    another shape, which BLAS may sum in another order, so they agree to float32 rounding."""
    s = inspected(name)
    golden, model, full = s.golden, s.model, s.r
    T = len(golden["input_ids"])
    cases = ([T - 1, 1, T // 2],) if name == DEFAULT else ([T - 1, 0], [1, T // 2, T - 2], [7], list(range(0, T, 3)))
    for positions in cases:
        r = inspection.inspect(model, golden["input_ids"], golden_request(model, golden, positions=positions))
        assert r.positions == sorted(positions) and r.logprobs == full.logprobs
        for i, p in enumerate(r.positions):
            assert r.lens[i][-1] == full.lens[p][-1]
            for layer, (a, b) in enumerate(zip(r.lens[i], full.lens[p])):
                assert_same_lens_row(a, b, f"{name}: position {p}, layer {layer}, positions={positions}")
            for pair, rows in r.attention.items():
                assert np.array_equal(rows[i], full.attention[pair][p]), f"{name} {pair}: position {p}"


def assert_same_lens_row(a, b, where, tol=1e-5):
    """Two computations of one lens row: the same numbers within tol; the same tokens, except
    where two candidates are within tol of each other (either order is then right); the same
    rank of the next token, or one apart (a token tied with it within tol)."""
    assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=tol), where
    assert a.entropy == pytest.approx(b.entropy, abs=tol), where
    assert (a.next_logprob is None) == (b.next_logprob is None), where
    if a.next_logprob is not None:
        assert a.next_logprob == pytest.approx(b.next_logprob, abs=tol), where
        assert abs(a.next_rank - b.next_rank) <= 1, where
    logprobs = [lp for _, lp in b.top]
    apart = [x - y > tol for x, y in zip(logprobs, logprobs[1:])] + [True]  # from the next candidate
    for k, (x, y) in enumerate(zip(a.top, b.top)):
        if apart[k] and (k == 0 or apart[k - 1]):
            assert x[0] == y[0], where


def test_lens_row_breaks_ties_toward_the_lower_id():
    """As transformers' stable sort does (and the golden files): also for a tie across the top-k
    boundary, where a partial selection may pick either of the tied tokens."""
    row = np.full(300, -9.0, dtype=np.float32)
    row[[250, 120, 7, 299, 60, 33, 200]] = -2.0  # seven tokens tied for second place
    row[5] = -1.0
    lens = inspection.lens_row(row, 299, TOP)
    assert lens.top == [(5, -1.0), (7, -2.0), (33, -2.0), (60, -2.0), (120, -2.0)]
    assert lens.next_rank == 2 and lens.next_logprob == -2.0


# ---------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def default_config(default_model_dir):
    return load_config(default_model_dir)  # 30 layers, 9 heads


def refused(config, n_tokens, **kwargs):
    with pytest.raises(inspection.InspectionError) as caught:
        inspection.request(config, n_tokens, **kwargs)
    return caught.value


def test_request_refuses_what_is_too_large_and_says_how_to_narrow(default_config):
    c, L, H = default_config, default_config.num_hidden_layers, default_config.num_attention_heads
    e = refused(c, inspection.MAX_TOKENS + 1, top=5)
    assert e.param == "prompt" and e.too_large
    assert "shorter prompt" in str(e) and str(inspection.MAX_TOKENS) in str(e)

    for top in (inspection.MAX_TOP + 1, 0):
        e = refused(c, 10, top=top)
        assert e.param == "logit_lens.top" and f"1 to {inspection.MAX_TOP}" in str(e)

    # The lens over every position of a long prompt: too many rows through the head; so many positions pass.
    most = inspection.MAX_LENS_ROWS // (L + 1)
    assert most < inspection.MAX_TOKENS
    e = refused(c, inspection.MAX_TOKENS, top=1)
    assert e.param == "logit_lens" and e.too_large
    assert f"at most {most} positions" in str(e) and "`positions`" in str(e)
    assert inspection.request(c, inspection.MAX_TOKENS, positions=range(most), top=1).top == 1
    # Within the rows, too many candidates: a smaller top, which passes.
    smaller = inspection.MAX_LENS_ENTRIES // (most * (L + 1))
    assert smaller < inspection.MAX_TOP
    e = refused(c, most, top=inspection.MAX_TOP)
    assert e.param == "logit_lens.top" and e.too_large
    assert f"smaller top (at most {smaller} here)" in str(e) and "fewer positions" in str(e)
    assert inspection.request(c, most, top=smaller).top == smaller

    # Every head of every layer over a long prompt: too many weights; as many heads as fit pass.
    per_head = inspection.MAX_TOKENS * (inspection.MAX_TOKENS + 1) // 2  # row t holds t + 1 weights
    fit = inspection.MAX_ATTENTION_WEIGHTS // per_head
    assert 1 <= fit < L * H
    e = refused(c, inspection.MAX_TOKENS, layers="all", heads="all")
    assert e.param == "attention" and e.too_large
    assert "fewer layers or heads" in str(e) and "`positions`" in str(e)
    assert str(inspection.MAX_ATTENTION_WEIGHTS) in str(e)
    heads = range(min(fit, H))
    assert len(inspection.request(c, inspection.MAX_TOKENS, layers=[L - 1], heads=heads).pairs) == len(heads)
    e = refused(c, inspection.MAX_TOKENS, positions=range(inspection.MAX_TOKENS), layers=range(fit + 1), heads=[0])
    assert e.param == "attention"

    # Values that cannot be, whatever the size.
    for n_tokens, kwargs, param, words in (
        (0, {}, "prompt", "no tokens"),
        (10, dict(layers=[L], heads=[0]), "attention.layers", f"{L} layers, numbered 0 to {L - 1}"),
        (10, dict(layers=[-1], heads=[0]), "attention.layers", f"numbered 0 to {L - 1}"),
        (10, dict(layers=[0], heads=[H]), "attention.heads", f"{H} heads, numbered 0 to {H - 1}"),
        (10, dict(positions=[10]), "positions", "positions 0 to 9"),
        (10, dict(positions=[-1]), "positions", "positions 0 to 9"),
        (10, dict(positions=[]), "positions", "leave it out"),
    ):
        e = refused(c, n_tokens, **kwargs)
        assert e.param == param and words in str(e), (kwargs, e.param, str(e))
        assert not e.too_large, (kwargs, str(e))


# ---------------------------------------------------------------- array_api_strict


def test_inspection_runs_in_the_strict_array_namespace():
    """Gemma 2 (attention and final soft caps, sliding and global layers) under array_api_strict:
    the same lens and weights as under NumPy, so no NumPy-only spelling hides in the probe."""
    golden = load_golden("inspection/gemma2-tiny.json")
    ids, runs = golden["input_ids"], []
    for xp in (None, array_api_strict):
        model = load_model(GOLDEN / golden["model"], xp=xp)
        runs.append(inspection.inspect(model, ids, inspection.request(model.config, len(ids), top=TOP,
                                                                     layers="all", heads="all")))
    strict, reference = runs
    assert_within(strict.logprobs[1:], reference.logprobs[1:], STRICT_TOLERANCE, "strict logprobs")
    for i in range(len(ids)):
        for ours, theirs in zip(strict.lens[i], reference.lens[i], strict=True):
            assert [j for j, _ in ours.top] == [j for j, _ in theirs.top]
            assert_within([lp for _, lp in ours.top], [lp for _, lp in theirs.top], STRICT_TOLERANCE, "strict lens")
            assert_within([ours.entropy], [theirs.entropy], STRICT_TOLERANCE, "strict entropy")
            assert ours.next_rank == theirs.next_rank
        for pair in reference.attention:
            assert_within(strict.attention[pair][i], reference.attention[pair][i], STRICT_TOLERANCE, f"strict {pair}")
