"""
Tests of tiny text diffusion: the math of diffusion.py against brute force, both models' structure,
learning, and the command lines end to end on a tiny synthetic text. Everything runs on a CPU in a
temporary folder, offline, in a few minutes at most.

    python -m pytest -q test_smoke.py
"""
import ast
import builtins
import contextlib
import errno
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import diffusion  # noqa: E402
import gpt  # noqa: E402
import prepare  # noqa: E402
import plumbing  # noqa: E402
import visualize  # noqa: E402

# tiny models for everything that trains; one thread, so that two processes never fight over cores
TINY = ['--n-layer', '1', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '8', '--eval-iters', '2']
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONWARNINGS='ignore')
# where no GPT of the tiny text is at hand, the diffusion model trains from random weights
INIT = {gpt: [], diffusion: ['--init', 'none'], 'gpt': [], 'diffusion': ['--init', 'none']}
WORDS = 'the cat sat on a mat and dog ran to its red hat but not when sun was low'.split()


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_sigint():
    # train() and main() install their own Ctrl-C handlers; give pytest its own back afterwards
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def corpus(n_chars=4000, seed=0):
    """A text of random sentences over a small vocabulary of words."""
    rng, text = random.Random(seed), ''
    while len(text) < n_chars:
        text += ' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + '.\n'
    return text


def run(script, *args, cwd, timeout=600):
    """Run one of the project's scripts as a user would, in cwd."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def call_main(module, argv, monkeypatch, capsys):
    """Run module.main() in this process with sys.argv = argv: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py', *map(str, argv)])
    capsys.readouterr()
    try:
        module.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    """A failure the user can act on: exit != 0, a single 'error: ...' line, no traceback."""
    assert code != 0, err
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, err)
    return errors[0]


def make_args(module, data_dir, out, *extra):
    """Tiny settings; diffusion from random weights (--init none) unless extra says otherwise."""
    init = ['--init', 'none'] if module is diffusion and '--init' not in extra else []
    return module.parse_args([*TINY, '--data-dir', str(data_dir), '--out', str(out), '--device', 'cpu', *init,
                              *map(str, extra)])


# -----------------------------------------------------------------------------
# brute-force references for the forward process of one character

def rate_matrix(graph, N):
    """Q with dp/dt = sigma(t) Q p: Q[y, x] is the rate of x -> y. States 0..N-1, plus N = mask for absorb."""
    if graph == 'uniform':
        return torch.ones(N, N, dtype=torch.float64) / N - torch.eye(N, dtype=torch.float64)
    Q = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    Q[N, :N] = 1.0
    Q[range(N), range(N)] = -1.0
    return Q


def kernel(graph, N, sigma_bar):
    """exp(sigma_bar Q)[y, x] = p(x_t = y | x_0 = x), by a generic matrix exponential."""
    return torch.linalg.matrix_exp(float(sigma_bar) * rate_matrix(graph, N))


# -----------------------------------------------------------------------------
# 1. forward process

def test_noise_schedule():
    """sigma is d sigma_bar / dt; uniform spans SIGMA_MIN..SIGMA_MAX geometrically; absorb masks with probability t."""
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    h = 1e-6
    for graph in ('uniform', 'absorb'):
        sigma_bar, sigma = diffusion.noise(t, graph)
        numeric = (diffusion.noise(t + h, graph)[0] - diffusion.noise(t - h, graph)[0]) / (2 * h)
        assert torch.allclose(sigma, numeric, rtol=1e-5), graph
    ends = diffusion.noise(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 'uniform')[0]
    assert torch.allclose(ends, torch.tensor([1e-4, math.sqrt(1e-4 * 20), 20.0], dtype=torch.float64))
    sigma_bar = diffusion.noise(t, 'absorb')[0]
    assert torch.allclose(-torch.expm1(-sigma_bar), t)


@pytest.mark.parametrize('sigma_bar', [0.01, 0.5, 2.0, 20.0])
def test_perturb_uniform_matches_eq3(sigma_bar):
    """Uniform perturb: every cell of the empirical transition matrix matches exp(sigma_bar Q) (Eq. 3)."""
    N, n = 7, 210_000
    torch.manual_seed(0)
    x0 = torch.arange(N).repeat(n // N)[None]
    xt = diffusion.perturb(x0, torch.tensor([sigma_bar]), 'uniform', N)[0]
    counts = torch.zeros(N, N, dtype=torch.float64)
    counts.index_put_((xt, x0[0]), torch.ones(n, dtype=torch.float64), accumulate=True)
    rows = n // N
    empirical = counts / rows  # empirical[y, x] = freq(x_t = y | x_0 = x)
    K = kernel('uniform', N, sigma_bar)
    stay = math.exp(-sigma_bar) + (1 - math.exp(-sigma_bar)) / N  # Eq. 3, first line
    assert torch.allclose(K.diagonal(), torch.full((N,), stay, dtype=torch.float64))
    se = (K * (1 - K) / rows).sqrt() + 1e-12
    assert ((empirical - K).abs() <= 5 * se + 1e-9).all(), (empirical - K).abs().max()
    # the characters that moved are uniform over the other N - 1 (a chi-square bound)
    moved = counts.clone()
    moved.fill_diagonal_(0)
    expected = moved.sum(0, keepdim=True) / (N - 1)
    off = ~torch.eye(N, dtype=torch.bool)
    chi2 = ((moved - expected) ** 2 / expected.clamp(min=1e-12))[off].sum().item()
    df = N * (N - 2)
    assert chi2 < df + 6 * math.sqrt(2 * df), chi2
    stayed = counts.diagonal().sum().item() / n
    assert abs(stayed - stay) < 5 * math.sqrt(stay * (1 - stay) / n) + 1e-12


@pytest.mark.parametrize('sigma_bar', [0.01, 0.5, 2.0, 20.0])
def test_perturb_absorb_masks_with_the_right_probability(sigma_bar):
    """Absorb perturb: a character is masked (id N) with probability 1 - e^-sigma_bar, otherwise unchanged."""
    N, n = 7, 200_000
    torch.manual_seed(0)
    x0 = torch.randint(N, (1, n))
    xt = diffusion.perturb(x0, torch.tensor([sigma_bar]), 'absorb', N)
    masked = xt == N
    assert torch.equal(xt[~masked], x0[~masked])
    p = 1 - math.exp(-sigma_bar)
    assert abs(masked.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert math.isclose(kernel('absorb', N, sigma_bar)[N, 0].item(), p, rel_tol=1e-9)


# -----------------------------------------------------------------------------
# 2. score entropy

def score_entropy_brute(log_score, sigma_bar, x_t, x0, graph, weight=None):
    """Eq. 7 without sigma(t), one position and one y at a time: sum over y != x_t of
    Q[x_t, y] (s_y - a_y log s_y + K(a_y)), a_y = p(y | x_0) / p(x_t | x_0) from the matrix exponential."""
    B, T, N = log_score.shape
    Q = rate_matrix(graph, N)
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        K = kernel(graph, N, sigma_bar[b])
        for i in range(T):
            xt, x_0 = int(x_t[b, i]), int(x0[b, i])
            for y in range(N):  # the real characters; Q[x_t, mask] = 0, so y = mask never counts
                if y == xt:
                    continue
                w = Q[xt, y].item() if weight is None else weight
                if w == 0:
                    continue
                a = (K[y, x_0] / K[xt, x_0]).item()
                s, log_s = math.exp(log_score[b, i, y]), log_score[b, i, y].item()
                out[b, i] += w * (s - a * log_s + (a * (math.log(a) - 1) if a > 0 else 0.0))
    return out


def random_inputs(graph, N=6, T=10, sigma_bars=(0.05, 0.7, 3.0, 12.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sigma_bar = torch.tensor(sigma_bars, dtype=torch.float64)
    x0 = torch.randint(N, (len(sigma_bars), T), generator=g)
    x_t = diffusion.perturb(x0, sigma_bar, graph, N)
    log_score = 2 * torch.randn(len(sigma_bars), T, N, generator=g, dtype=torch.float64)
    return log_score, sigma_bar, x_t, x0


def test_score_entropy_uniform_matches_brute_force():
    """Uniform: the closed form equals Eq. 7 summed term by term with Q = J/N - I (weight 1/N, not 1/(N-1))."""
    N = 6
    log_score, sigma_bar, x_t, x0 = random_inputs('uniform', N)
    assert (x_t == x0).any() and (x_t != x0).any()  # both branches of the closed form are exercised
    closed = diffusion.score_entropy(log_score, sigma_bar, x_t, x0, 'uniform')
    assert closed.shape == x0.shape and closed.dtype == torch.float64
    brute = score_entropy_brute(log_score, sigma_bar, x_t, x0, 'uniform')
    assert torch.allclose(closed, brute, rtol=1e-5, atol=1e-8)
    # the annotated notebook's 1/(N-1) makes the loss N/(N-1) times the bound; the tolerance above sees that
    notebook = score_entropy_brute(log_score, sigma_bar, x_t, x0, 'uniform', weight=1 / (N - 1))
    assert torch.allclose(notebook, closed * N / (N - 1), rtol=1e-5)
    assert not torch.allclose(closed, notebook, rtol=1e-5, atol=1e-8)


def test_score_entropy_absorb_matches_brute_force():
    """Absorb: only masked positions count; the closed form equals Eq. 7 summed term by term."""
    N = 6
    log_score, sigma_bar, x_t, x0 = random_inputs('absorb', N)
    masked = x_t == N
    assert masked.any() and (~masked).any()
    closed = diffusion.score_entropy(log_score, sigma_bar, x_t, x0, 'absorb')
    brute = score_entropy_brute(log_score, sigma_bar, x_t, x0, 'absorb')
    assert torch.allclose(closed, brute, rtol=1e-5, atol=1e-8)
    assert (closed[~masked] == 0).all() and (closed[masked] > 0).all()


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_score_entropy_is_a_divergence(graph):
    """Score entropy is >= 0 for any score, and 0 where the score is the true ratio a_y."""
    N = 6
    for seed in range(5):
        log_score, sigma_bar, x_t, x0 = random_inputs(graph, N, T=50, sigma_bars=tuple(10 ** np.linspace(-3, 1.3, 8)), seed=seed)
        loss = diffusion.score_entropy(log_score, sigma_bar, x_t, x0, graph)
        assert (loss >= -1e-10).all(), loss.min()
    # the exact ratios a_y = p(y | x_0) / p(x_t | x_0) give 0
    exact = torch.empty_like(log_score)
    for b in range(x0.shape[0]):
        K = kernel(graph, N, sigma_bar[b])
        for i in range(x0.shape[1]):
            exact[b, i] = (K[:N, x0[b, i]] / K[x_t[b, i], x0[b, i]]).log()
    loss = diffusion.score_entropy(exact, sigma_bar, x_t, x0, graph)
    assert loss.abs().max() < 1e-6
    if graph == 'absorb':
        assert (x_t == N).sum() > 100  # many masked positions checked
    wrong = diffusion.score_entropy(exact + 0.1, sigma_bar, x_t, x0, graph)
    assert wrong.max() > 1e-3  # and it does see a wrong score


# -----------------------------------------------------------------------------
# 3. sampler

class Oracle(nn.Module):
    """The exact log concrete score of a product distribution pi (L, N) of the characters after a window's first,
    under either forward process."""

    def __init__(self, pi, graph):
        super().__init__()
        self.pi, self.config = pi, diffusion.Config(vocab_size=pi.shape[1], graph=graph)

    def forward(self, x, sigma_bar):
        sb = sigma_bar.double()[:, None, None]
        if self.config.graph == 'absorb':  # s_y = pi_y / (e^sigma_bar - 1) at a mask
            return (self.pi.log()[None] - torch.log(torch.expm1(sb))).expand(x.shape[0], -1, -1).float()
        p_t = torch.exp(-sb) * self.pi[None] + -torch.expm1(-sb) / self.pi.shape[1]  # Eq. 2 per position
        return (p_t.log() - p_t.log().gather(-1, x[:, 1:, None])).float()


def product_distribution(L=3, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(L, N, generator=g, dtype=torch.float64), -1)


def marginal_tv(pi, graph, samples=20_000, steps=16, seed=0, temperature=1.0, target=None):
    """Largest per-position total variation between diffusion.generate's samples (oracle score) and target (default: pi)."""
    torch.manual_seed(seed)
    x = diffusion.generate(Oracle(pi, graph), samples, pi.shape[0], steps=steps, temperature=temperature)
    pi = pi if target is None else target
    assert x.shape == (samples, pi.shape[0]) and x.min() >= 0 and x.max() < pi.shape[1]
    empirical = F.one_hot(x, pi.shape[1]).double().mean(0)
    return 0.5 * (empirical - pi).abs().sum(-1).max().item()


TV_BOUND = 0.03  # sampling noise alone is about 0.006 for 20000 samples of N = 5


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_sampler_with_oracle_reproduces_the_distribution(graph):
    """Fed the exact concrete score of a product distribution, the Tweedie sampler reproduces its marginals."""
    assert marginal_tv(product_distribution(), graph) < TV_BOUND


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_absorb_temperature_tempers_the_denoiser(temperature):
    """Absorbing graph: each position is revealed once, from p(x_0 | x_t) ** (1 / T), so the oracle's product
    distribution comes out tempered, pi ** (1 / T) normalised, and plainly not pi itself."""
    pi = product_distribution()
    tempered = pi ** (1 / temperature) / (pi ** (1 / temperature)).sum(-1, keepdim=True)
    assert 0.5 * (tempered - pi).abs().sum(-1).max() > 3 * TV_BOUND
    assert marginal_tv(pi, 'absorb', temperature=temperature, target=tempered) < TV_BOUND


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_sampler_test_sees_a_sign_error(graph, monkeypatch):
    """The bound above is tight enough: tweedie_probs with the sign of dsigma flipped in the staggered score fails it."""
    right = diffusion.tweedie_probs

    def flipped(score, x, dsigma, graph):
        if graph == 'absorb':
            return right(score, x, -dsigma, graph)
        N = score.shape[-1]
        staggered = (-dsigma).exp() * score + (1 - (-dsigma).exp()) * score.sum(-1, keepdim=True) / N
        return staggered * (-torch.expm1(-dsigma) / N + (-dsigma).exp() * F.one_hot(x, N))
    monkeypatch.setattr(diffusion, 'tweedie_probs', flipped)
    assert marginal_tv(product_distribution(), graph) > TV_BOUND


def bayes_posterior(graph, p0, sb_t, sb_s, x):
    """Exact p(x_s = y | x_t = x) for one character, s < t, by Bayes' rule and matrix exponentials."""
    N = p0.shape[0]
    p0 = torch.cat([p0, torch.zeros(1, dtype=torch.float64)]) if graph == 'absorb' else p0
    p_s, p_t = kernel(graph, N, sb_s) @ p0, kernel(graph, N, sb_t) @ p0
    score = p_t[:N] / p_t[x]  # the exact concrete score at x_t = x
    return score, p_s * kernel(graph, N, sb_t - sb_s)[x, :] / p_t[x]


def wrong_way_round(score, x, dsigma, graph):
    """Eq. 8 with a factor left out: the forward transition (uniform) or the staggering exp(-dsigma Q) (absorb)."""
    N = score.shape[-1]
    if graph == 'absorb':
        unmask = -torch.expm1(-dsigma) * score
        probs = torch.cat([unmask, 1 - unmask.sum(-1, keepdim=True)], dim=-1)
        return torch.where((x == N)[..., None], probs, F.one_hot(x, N + 1).to(probs))
    return dsigma.exp() * score + (1 - dsigma.exp()) * score.sum(-1, keepdim=True) / N


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_tweedie_step_is_bayes_rule(graph):
    """One Tweedie step (Eq. 8) with the exact score is the exact posterior p(x_s | x_t), for every x_t."""
    N, worst_bad = 5, 0.0
    p0 = product_distribution(1, N, seed=1)[0]
    for sb_t, sb_s in ((0.3, 0.1), (2.0, 0.5), (6.0, 1.0), (1e-3, 0.0)):
        for x in (range(N) if graph == 'uniform' else range(N + 1)):
            score, posterior = bayes_posterior(graph, p0, sb_t, sb_s, x)
            dsigma = torch.tensor(sb_t - sb_s, dtype=torch.float64)
            got = diffusion.tweedie_probs(score[None, None], torch.tensor([[x]]), dsigma, graph)[0, 0]
            assert torch.allclose(got, posterior, atol=1e-9), (sb_t, sb_s, x, got, posterior)
            bad = wrong_way_round(score[None, None], torch.tensor([[x]]), dsigma, graph)[0, 0]
            worst_bad = max(worst_bad, (bad / bad.sum() - posterior).abs().max().item())
    assert worst_bad > 0.05  # the comparison does see a missing factor


class JointOracle(nn.Module):
    """The exact log concrete score of any distribution p over texts of L characters (a tensor (N,) * L) under the
    absorbing process: at a mask, s_y = p(x_0 = y there | the characters not masked) / (e^sigma_bar - 1)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.config = p.flatten(), diffusion.Config(vocab_size=p.shape[0], graph='absorb')
        self.texts = torch.cartesian_prod(*[torch.arange(p.shape[0])] * p.dim())  # every text, in the order of p.flatten()
        self.one_hot = F.one_hot(self.texts, p.shape[0]).double()

    def forward(self, x, sigma_bar):
        N, x = self.config.vocab_size, x[:, 1:]  # the window's first character is the start token
        fits = ((x[:, None] == self.texts) | (x[:, None] == N)).all(-1)  # (B, N^L): the texts that x masks
        weight = self.p * fits
        conditional = torch.einsum('bs,sly->bly', weight, self.one_hot) / weight.sum(-1)[:, None, None]
        return (conditional.log() - torch.log(torch.expm1(sigma_bar.double()))[:, None, None]).float()


def test_given_characters_give_the_exact_conditional():
    """Absorb, with the exact score of a joint distribution of 3 characters (N = 3) and the middle one given: generate
    draws the outer two from p(x_0, x_2 | x_1), Bayes' rule over all 27 texts. Infilling, exactly, not just kept characters."""
    N, n, middle = 3, 10_000, 1
    p = torch.softmax(2 * torch.randn(N ** 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0).view(N, N, N)
    torch.manual_seed(0)
    x = diffusion.generate(JointOracle(p), n, 3, steps=128, given=torch.tensor([N, middle, N]))
    assert (x[:, 1] == middle).all() and x.max() < N
    empirical = torch.zeros(N, N, dtype=torch.float64).index_put_((x[:, 0], x[:, 2]), torch.ones(n, dtype=torch.float64), accumulate=True) / n
    exact = p[:, middle] / p[:, middle].sum()
    assert 0.5 * (empirical - exact).abs().sum() < TV_BOUND  # measured: 0.005
    assert 0.5 * (p.sum(1) - exact).abs().sum() > 0.5  # a sampler that ignored the given character would be this far off


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
@pytest.mark.parametrize('length,starts', [(45, [0, 8, 16, 24, 30]), (20, [0, 5]), (15, [0]), (16, [0, 1]), (40, [0, 8, 16, 24, 25])])
def test_long_text_is_made_window_by_window(graph, length, starts):
    """The start token then the text; beyond the context (16), generate makes full windows 8 characters apart, the
    last one ending with the text. Every frame of each window holds what it shares with the window before as that one
    finished, and the windows after it are still masks; the text is the windows put together; the given characters
    are kept."""
    torch.manual_seed(0)
    model = diffusion.Transformer(tiny_config(diffusion, graph=graph)).eval()
    N, steps = 11, 3
    given = torch.full((length,), N)
    given[:5] = torch.tensor([1, 2, 3, 4, 5])
    windows = []
    with_start = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # noqa: E731

    def callback(step, x):  # x: the whole text so far, after the start token
        if step == 0:
            windows.append([])
        start = starts[len(windows) - 1]
        windows[-1].append(with_start(x)[:, start:start + 16].clone())
        assert (with_start(x)[:, start + 16:] == N).all()
    x = diffusion.generate(model, 2, length, steps, callback=callback, given=given)
    assert x.shape == (2, length) and x.max() < N and (x[:, :5] == given[:5]).all()
    assert [len(frames) for frames in windows] == [steps + 1] * len(starts)
    for k, (start, frames) in enumerate(zip(starts, windows)):
        assert torch.equal(frames[-1], with_start(x)[:, start:start + 16])
        if k:
            shift = start - starts[k - 1]
            for frame in frames[1:]:
                assert torch.equal(frame[:, :16 - shift], windows[k - 1][-1][:, shift:])


# -----------------------------------------------------------------------------
# 4. structure of the two networks

def tiny_config(module, **kw):
    return module.Config(**dict(dict(vocab_size=11, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0), **kw))


def test_gpt_is_causal():
    """The GPT's logits at positions <= i do not depend on the characters after i (and do on those up to i)."""
    torch.manual_seed(0)
    model = gpt.Transformer(tiny_config(gpt)).eval()
    idx = torch.randint(11, (3, 16))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (3, 16, 11) and logits.dtype == torch.float32
        for i in (0, 5, 14):
            changed = idx.clone()
            changed[:, i + 1:] = (changed[:, i + 1:] + 1 + torch.randint(10, changed[:, i + 1:].shape)) % 11
            new = model(changed)
            assert torch.allclose(new[:, :i + 1], logits[:, :i + 1], atol=1e-6)
            assert (new[:, i + 1:] - logits[:, i + 1:]).abs().amax(-1).min() > 1e-6  # every later position sees it


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_diffusion_is_bidirectional(graph):
    """Changing the character at position j changes the diffusion model's scores of every character up to j (output
    i scores character i + 1)."""
    torch.manual_seed(0)
    model = diffusion.Transformer(tiny_config(diffusion, graph=graph)).eval()
    idx = torch.randint(11, (3, 16))
    sigma_bar = torch.tensor([0.1, 1.0, 5.0])
    with torch.no_grad():
        out = model(idx, sigma_bar)
        for j in (3, 15):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1) % 11
            diff = (model(changed, sigma_bar) - out).abs().amax(-1)
            assert (diff[:, :j] > 1e-6).all()


def test_diffusion_output_is_a_concrete_score():
    """The scores of characters 1..T-1 of a window. uniform: log s at y = x_t is exactly 0; absorb: sum_y s_y =
    1 / (e^sigma_bar - 1), and the mask is an input id."""
    torch.manual_seed(0)
    sigma_bar = torch.tensor([0.01, 1.0, 10.0])
    model = diffusion.Transformer(tiny_config(diffusion, graph='uniform')).eval()
    idx = torch.randint(11, (3, 16))
    with torch.no_grad():
        out = model(idx, sigma_bar)
    assert out.shape == (3, 15, 11) and out.dtype == torch.float32
    assert (out.gather(-1, idx[:, 1:, None]) == 0).all() and (out != 0).sum() == 3 * 15 * 10
    model = diffusion.Transformer(tiny_config(diffusion, graph='absorb')).eval()
    idx[:, ::2] = 11  # masks
    with torch.no_grad():
        out = model(idx, sigma_bar)
    assert out.shape == (3, 15, 11)
    assert torch.allclose(out.logsumexp(-1), -torch.log(torch.expm1(sigma_bar))[:, None].expand(3, 15), atol=1e-5)


def test_absorb_network_ignores_the_noise_level():
    """absorb: p(x_0 | x_t) = softmax of the output is the same at every noise level, which only
    scales the score by 1 / (e^sigma_bar - 1); the uniform network's output does depend on it."""
    torch.manual_seed(0)
    idx = torch.randint(12, (2, 16))
    with torch.no_grad():
        absorb = diffusion.Transformer(tiny_config(diffusion, graph='absorb')).eval()
        assert not any('noise' in name for name, _ in absorb.named_parameters())
        probs = [absorb(idx, torch.full((2,), s)).softmax(-1) for s in (1e-3, 0.5, 3.0, 15.0)]
        assert all(torch.allclose(p, probs[0], atol=1e-6) for p in probs)
        uniform = diffusion.Transformer(tiny_config(diffusion, graph='uniform')).eval()
        outs = [uniform(idx % 11, torch.full((2,), s)) for s in (1e-3, 3.0)]
        assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_absorb_checkpoint_of_before_the_shift_is_refused(tmp_path, monkeypatch, capsys):
    """An absorbing checkpoint written before the GPT's shift (no 'format' 2) would load and write nonsense: it is
    refused with one line. A uniform one of that time (the same network today) still loads."""
    for graph in ('absorb', 'uniform'):
        model = diffusion.Transformer(tiny_config(diffusion, graph=graph))
        torch.save(dict(kind='diffusion', config=asdict(model.config), vocab='abcdefghijk', model=model.state_dict(),
                        step=1, summary=dict(tokens=0, seconds=0.0)), tmp_path / f'{graph}.pt')
    code, _, err = call_main(diffusion, ['--ckpt', tmp_path / 'absorb.pt'], monkeypatch, capsys)
    assert_one_error_line(code, err, 'earlier version', 'python diffusion.py --train')
    loaded, _ = diffusion.load_checkpoint(str(tmp_path / 'uniform.pt'))
    assert loaded.config.graph == 'uniform'


def test_absorb_sampler_skips_passes_that_would_change_nothing():
    """The absorbing sampler runs the network only after a step that changed some character (its
    output cannot differ otherwise): 1 + (steps that changed something) passes, and at many steps
    for few characters far fewer than steps + 1. The uniform sampler runs it at every step."""
    torch.manual_seed(0)
    for graph, steps in (('absorb', 64), ('absorb', 4), ('uniform', 16)):
        model = diffusion.Transformer(tiny_config(diffusion, graph=graph)).eval()
        frames = []
        x, passes, _, _ = diffusion.measure(model, lambda: diffusion.generate(
            model, 1, 15, steps=steps, callback=lambda step, x: frames.append(x.clone())))
        # step k runs the network on what step k - 1 made (after the start token); the first, on the masks
        inputs = [torch.full((1, 15), 11)] + frames[:-1]
        changed = sum(not torch.equal(a, b) for a, b in zip(inputs, inputs[1:]))
        if graph == 'absorb':
            assert passes == 1 + changed
            assert passes <= 17 or steps < 16
        else:
            assert passes == steps + 1
        assert (x < 11).all()
    # several samples at once: only those that the last step changed are fed again
    model = diffusion.Transformer(tiny_config(diffusion, graph='absorb')).eval()
    frames = []
    x, passes, flops, _ = diffusion.measure(model, lambda: diffusion.generate(
        model, 4, 15, steps=64, callback=lambda step, x: frames.append(x.clone())))
    inputs = [torch.full((4, 15), 11)] + frames[:-1]
    rows = [(a != b).any(-1) for a, b in zip(inputs, inputs[1:])]  # (4,) per step after the first
    assert passes == 1 + sum(bool(r.any()) for r in rows)
    fed = 4 + sum(int(r.sum()) for r in rows)  # samples fed, over all steps
    assert fed < 4 * passes and flops == 2 * sum(p.numel() for p in model.parameters()) * 16 * fed


class NextPosition(nn.Module):
    """An absorbing 'network' sure that the character after position i is (i + 1) mod N."""

    def __init__(self, N=11):
        super().__init__()
        self.config = diffusion.Config(vocab_size=N, block_size=16, graph='absorb')

    def forward(self, x, sigma_bar):
        N = self.config.vocab_size
        logits = 30.0 * F.one_hot(torch.arange(1, x.shape[1]) % N, N).double()  # (T - 1, N)
        return (logits.log_softmax(-1)[None] - torch.log(torch.expm1(sigma_bar.double()))[:, None, None]).float()


def test_output_at_position_i_scores_character_i_plus_1():
    """Absorb keeps the GPT's shift. A network sure that the character after position i is (i + 1) mod N gives the
    text 0, 1, 2, ... a loss of about 0, and the sampler writes exactly that text after the start token (position 0).
    Read without the shift (position i scoring character i), the same network's loss is several nats."""
    model = NextPosition()
    text = (torch.arange(16) % 11).repeat(64, 1)
    torch.manual_seed(0)
    assert diffusion.loss_fn(model, text).item() < 1e-3
    torch.manual_seed(0)
    assert diffusion.loss_fn(model, (text + 1) % 11).item() > 3
    torch.manual_seed(0)
    assert torch.equal(diffusion.generate(model, 3, 15, steps=8), (torch.arange(1, 16) % 11).repeat(3, 1))


def test_the_transformer_shifts_its_output(monkeypatch):
    """The real Transformer (absorbing graph) has the shift: with its attention made causal, as the GPT's, its output
    at row i (scoring character i + 1) depends on characters 0..i alone, so changing character j changes rows j and
    on, never row j - 1, the one that scores it. Without the shift, row j - 1 would be position j, which sees it."""
    monkeypatch.setattr(diffusion, 'CAUSAL', True)
    torch.manual_seed(0)
    model = diffusion.Transformer(tiny_config(diffusion, graph='absorb')).eval()
    x = torch.randint(12, (1, 16))
    with torch.no_grad():
        out = model(x, torch.ones(1))
        assert out.shape == (1, 15, 11)
        for j in (1, 5, 15):
            y = x.clone()
            y[0, j] = (x[0, j] + 1) % 12
            changed = (model(y, torch.ones(1)) - out).abs().amax(-1)[0] > 1e-6  # (15,) rows
            assert not changed[:j].any() and changed[j:].all(), (j, changed)


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_score_entropy_is_finite_at_every_state(graph):
    """Every pair (x_t, x_0), also one the forward process cannot reach (absorb: a character other than x_0), has a
    finite, non-negative score entropy with a finite gradient; an unreachable one scores 0, as in the SEDD code."""
    N = 5
    x_t, x0 = torch.cartesian_prod(torch.arange(N + (graph == 'absorb')), torch.arange(N)).T  # every pair
    for sigma_bar in (1e-4, 0.5, 20.0):
        log_score = torch.randn(1, len(x0), N, dtype=torch.float64, requires_grad=True)
        loss = diffusion.score_entropy(log_score, torch.tensor([sigma_bar], dtype=torch.float64), x_t[None], x0[None], graph)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and (loss >= -1e-12).all() and torch.isfinite(log_score.grad).all()
        if graph == 'absorb':
            unreachable = (x_t < N) & (x_t != x0)
            assert unreachable.sum() == N * (N - 1) and (loss[0, unreachable] == 0).all()


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_loss_with_the_exact_score_is_the_entropy(graph, monkeypatch):
    """Fed the exact score of a product distribution pi (3 characters after a given first one), loss_fn's mean over t
    and x_t is the NELBO, and with the exact score it is tight: the entropy of pi in nats per character, within 4
    standard errors of 2M draws (the prior term is below 1e-7). That is sharp enough to see a loss 1% off, and
    without the weight sigma(t) the same estimate is far off."""
    pi = product_distribution(L=3, N=5, seed=2)
    entropy = -(pi * pi.log()).sum(-1).mean().item()

    def estimate(batches, B=8192):
        torch.manual_seed(0)
        model, means = Oracle(pi, graph), []
        for _ in range(batches):
            text = torch.multinomial(pi, B, replacement=True).T  # (B, 3)
            means.append(diffusion.loss_fn(model, torch.cat([torch.zeros(B, 1, dtype=torch.long), text], 1)).item())
        return np.mean(means), np.std(means, ddof=1) / math.sqrt(batches)
    mean, se = estimate(256)
    assert abs(mean - entropy) < 4 * se, (mean, se, entropy)
    assert abs(1.01 * mean - entropy) > 4 * se and abs(0.99 * mean - entropy) > 4 * se, (mean, se, entropy)
    noise = diffusion.noise
    monkeypatch.setattr(diffusion, 'noise', lambda t, graph: (noise(t, graph)[0], torch.ones_like(t)))
    assert abs(estimate(8)[0] - entropy) > 0.1 * entropy  # the test above would fail


@pytest.mark.parametrize('order', plumbing.ORDERS)
def test_cached_sampler_draws_what_the_uncached_one_draws(order, monkeypatch):
    """The absorbing sampler, which feeds the network only the samples that the last step changed, draws the same
    characters from the same seed as a sampler that feeds it every sample at every step, in every order: 4 samples
    at once, from a network whose draws depend strongly on its input. And it runs the network fewer times."""
    monkeypatch.setattr(diffusion, 'autocast', lambda device: contextlib.nullcontext())
    N, length, steps, B, noise = 11, 15, 48, 4, 1.0
    ts = torch.linspace(1 - diffusion.T_EPS, diffusion.T_EPS, steps + 1)
    sigma_bars = torch.cat([diffusion.noise(ts, 'absorb')[0], torch.zeros(1)])
    masked_after = torch.cat([ts[1:] / ts[0], torch.zeros(1)])

    def every_step(model):
        x_t = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.full((B, length), N)], 1)  # start token, masks
        for step in range(steps + 1):
            sigma_bar, dsigma = sigma_bars[step], sigma_bars[step] - sigma_bars[step + 1]
            out = model(x_t, sigma_bar.expand(B))
            probs = diffusion.tweedie_probs((out.log_softmax(-1) - torch.log(torch.expm1(sigma_bar))).exp(),
                                            x_t[:, 1:], dsigma, 'absorb')
            probs = probs[..., :N] if step == steps else probs
            drawn = (probs.clamp(min=0) / torch.empty_like(probs).exponential_()).argmax(-1)
            if order != 'random':
                left = (torch.full((B,), length) * masked_after[step]).round()
                drawn = diffusion.reveal(out, x_t[:, 1:], left, order, noise)
            x_t = torch.where(x_t == N, torch.cat([x_t[:, :1], drawn], 1), x_t)
        return x_t[:, 1:]
    for seed in range(3):
        model = sharp_model(seed=seed)
        with torch.no_grad():
            # its draws depend on its input: two random texts give far apart distributions
            texts = torch.randint(N + 1, (2, 16), generator=torch.Generator().manual_seed(seed))
            p = model(texts, torch.ones(2)).softmax(-1)
            assert 0.5 * (p[0] - p[1]).abs().sum(-1).mean() > 0.5
            torch.manual_seed(100 + seed)
            expected = every_step(model)
            torch.manual_seed(100 + seed)
            x, passes, flops, _ = diffusion.measure(model, lambda: diffusion.generate(
                model, B, length, steps, order=order, confidence_noise=noise))
        fed = flops / (2 * sum(p.numel() for p in model.parameters()) * 16)  # samples fed, all passes
        assert torch.equal(x, expected) and (x < N).all() and fed < B * (steps + 1) / 2
        assert all(len(set(row)) > 2 for row in x.tolist()) and len(set(map(tuple, x.tolist()))) == B


# -----------------------------------------------------------------------------
# 3b. the order of unmasking (absorbing graph)

def sharp_model(graph='absorb', seed=0):
    """A tiny random Transformer whose head is scaled up, so that its draws depend strongly on its input."""
    torch.manual_seed(seed)
    model = diffusion.Transformer(tiny_config(diffusion, graph=graph)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


# 3 samples of 25 characters (two windows of 16) from a template, at temperature 0.9, computed before the orders
# existed: order='random' must keep drawing exactly these
TEMPLATE = [11, 3, 11, 11, 5, 11, 11, 11, 11, 11, 2] + [11] * 14
BEFORE_ORDERS = {
    'absorb': [[3, 3, 8, 2, 5, 2, 6, 0, 3, 8, 2, 3, 6, 7, 8, 0, 3, 4, 2, 5, 0, 6, 2, 1, 6],
               [3, 3, 8, 2, 5, 2, 1, 6, 6, 7, 2, 1, 6, 7, 9, 2, 5, 6, 2, 6, 6, 7, 2, 4, 4],
               [3, 3, 8, 0, 5, 2, 4, 6, 7, 0, 2, 6, 6, 7, 6, 7, 6, 6, 7, 6, 7, 0, 3, 6, 7]],
    'uniform': [[4, 3, 6, 4, 5, 4, 2, 0, 1, 10, 2, 0, 0, 9, 3, 4, 2, 2, 9, 0, 2, 0, 10, 2, 2],
                [2, 3, 2, 9, 5, 9, 2, 4, 0, 0, 2, 4, 1, 4, 2, 4, 2, 8, 4, 2, 7, 0, 9, 1, 0],
                [7, 3, 2, 2, 5, 0, 4, 0, 4, 4, 2, 1, 0, 9, 4, 0, 4, 9, 5, 0, 1, 1, 9, 2, 9]]}


@pytest.mark.parametrize('graph', ['uniform', 'absorb'])
def test_random_order_draws_what_it_drew_before_the_orders(graph, monkeypatch):
    """order='random' (the default of generate) is the Tweedie sampler as it was: from the same seed, the same
    characters as before decoding orders were added, with a template, two windows and a temperature."""
    monkeypatch.setattr(diffusion, 'autocast', lambda device: contextlib.nullcontext())
    model = sharp_model(graph)
    for kwargs in ({}, {'order': 'random', 'confidence_noise': 5.0}):
        torch.manual_seed(1)
        x = diffusion.generate(model, 3, len(TEMPLATE), steps=12, temperature=0.9, given=torch.tensor(TEMPLATE),
                               **kwargs)
        assert x.tolist() == BEFORE_ORDERS[graph]


@pytest.mark.parametrize('order', plumbing.ORDERS)
@pytest.mark.parametrize('length,steps', [(15, 4), (15, 40), (25, 12), (40, 7)])
def test_every_order_fills_every_mask_and_keeps_the_given(order, length, steps):
    """Every order, in one window or several, at fewer or more steps than characters: no mask is left, every given
    character is kept, and the text is a text (not one character)."""
    model, N = sharp_model(), 11
    given = torch.full((length,), N)
    given[::4] = torch.arange(0, length, 4) % N
    torch.manual_seed(0)
    x = diffusion.generate(model, 3, length, steps=steps, given=given, order=order, confidence_noise=1.0)
    assert x.shape == (3, length) and (x < N).all()
    kept = given < N
    assert torch.equal(x[:, kept], given[kept].expand(3, -1))
    assert all(len(set(row)) > 3 for row in x.tolist())


class Supports(nn.Module):
    """An absorbing 'network' that ignores its input: after position i it is uniform over the first sizes[i]
    characters, so that any character drawn there has probability exactly 1 / sizes[i]."""

    def __init__(self, sizes, N=11):
        super().__init__()
        self.sizes, self.config = sizes, diffusion.Config(vocab_size=N, block_size=len(sizes) + 1, graph='absorb')

    def forward(self, x, sigma_bar):
        N = self.config.vocab_size
        inside = torch.arange(N)[None] < torch.tensor(self.sizes)[:, None]  # (T - 1, N)
        logits = torch.where(inside, 0.0, -1e9).log_softmax(-1)
        return (logits[None] - torch.log(torch.expm1(sigma_bar))[:, None, None]).expand(len(x), -1, -1)


def frames_of(model, num_samples, length, steps, **kwargs):
    frames = [torch.full((num_samples, length), model.config.vocab_size)]
    diffusion.generate(model, num_samples, length, steps=steps, callback=lambda step, x: frames.append(x.clone()),
                       **kwargs)
    return frames


def test_confidence_order_reveals_the_likeliest_draws_first():
    """order='confidence' with no noise: at every step the revealed positions are those whose draw is likeliest (here
    the smallest supports), as many as the schedule expects (about length / steps, all by the last step). With a
    huge noise, the first position revealed is uniformly random (a chi-squared test over 4,000 samples)."""
    sizes = [5, 2, 9, 1, 7, 3, 11, 4]
    model, length, steps = Supports(sizes), len(sizes), 4
    torch.manual_seed(0)
    frames = frames_of(model, 16, length, steps, order='confidence', confidence_noise=0.0)
    expected = torch.tensor(sizes).argsort().tolist()  # the likeliest first
    for before, after in zip(frames, frames[1:]):
        revealed = ((before == 11) & (after < 11)).nonzero()[:, 1].view(16, -1)  # (samples, per step)
        count = revealed.shape[1]
        done = int((before[0] < 11).sum())
        assert sorted(revealed[0].tolist()) == sorted(expected[done:done + count])
        assert (revealed.sort(-1).values == revealed[:1].sort(-1).values).all()  # every sample alike
    counts = [int((b == 11).sum() - (a == 11).sum()) // 16 for b, a in zip(frames, frames[1:])]
    assert counts == [2, 2, 2, 2, 0] and (frames[-1] < 11).all()
    # a huge noise: the first position revealed (one per step) is any of them, equally often
    torch.manual_seed(0)
    frames = frames_of(model, 4000, length, length, order='confidence', confidence_noise=1e4)
    first = ((frames[0] == 11) & (frames[1] < 11)).float().argmax(-1)
    assert ((frames[1] < 11).sum(-1) == 1).all()
    counts = torch.bincount(first, minlength=length).double()
    chi2 = ((counts - 500) ** 2 / 500).sum().item()
    assert chi2 < 24.3, counts  # 7 degrees of freedom, p = 0.001
    # and no noise is never random: the smallest support always first
    torch.manual_seed(0)
    frames = frames_of(model, 100, length, length, order='confidence', confidence_noise=0.0)
    assert (frames[1][:, 3] < 11).all() and ((frames[1] < 11).sum(-1) == 1).all()


def test_left_to_right_order_reveals_position_i_before_i_plus_1():
    """order='left-to-right': after every step the revealed positions are a prefix, one character a step when
    steps equals the length (the diffusion network used as a GPT), and a few a step at fewer steps."""
    model, N = sharp_model(), 11
    for length, steps, per_step in ((15, 15, 1), (15, 5, 3)):
        torch.manual_seed(0)
        frames = frames_of(model, 4, length, steps, order='left-to-right')
        for frame in frames:
            masked = (frame == N).long()
            assert (masked.diff(dim=-1) >= 0).all()  # once masked, masked to the end
        assert [int((f == N).sum()) // 4 for f in frames] == [length - per_step * k for k in range(steps + 1)] + [0]


def test_uniform_graph_has_no_order_but_random():
    """generate refuses another order for the uniform graph, which has no masks to order."""
    with pytest.raises(ValueError, match='no masks'):
        diffusion.generate(sharp_model('uniform'), 1, 5, steps=2, order='confidence')


@pytest.mark.parametrize('argv', [['--order', 'confidence'], ['--order', 'left-to-right', '--seed', '3']])
def test_uniform_checkpoint_refuses_an_order(argv, monkeypatch, capsys):
    """Sampling a uniform-graph checkpoint with an order other than random is one line, before any sampling; without
    --order it samples in random order (the absorbing graph's default order does not apply to it)."""
    monkeypatch.setattr(diffusion, 'generate', lambda *a, **k: pytest.fail('sampled'))
    ckpt = str(REPO / 'weights' / 'uniform.pt')
    code, out, err = call_main(diffusion, ['--ckpt', ckpt, '--device', 'cpu', *argv], monkeypatch, capsys)
    assert_one_error_line(code, err, '--order', 'uniform', '--order random')
    assert code == 2 and out == ''
    args = diffusion.parse_args(['--ckpt', ckpt])
    assert plumbing.sampling_order(args, 'uniform', 'confidence') == 'random'
    assert plumbing.sampling_order(args, 'absorb', 'confidence') == 'confidence'


def test_diffusion_training_starts_as_the_gpt(trained, monkeypatch, capsys):
    """diffusion.py --train starts from the GPT of out/gpt.pt (gpt.py's default): at its first step every weight it
    shares with the GPT is the GPT's and the mask's embedding row is the mean of the others, so that with causal
    attention it computes the GPT's next-character probabilities. --init none starts from random weights."""
    workdir, logs = trained
    assert 'starting from the GPT of out/gpt.pt' in logs['diffusion.py']
    monkeypatch.chdir(workdir)
    the_gpt, _ = gpt.load_checkpoint('out/gpt.pt')
    gpt_weights = the_gpt.state_dict()
    first = {}

    def recording_loss(model, batch):  # the network of the first step, before its update
        if not first:
            first.update({k: v.clone() for k, v in model.state_dict().items()})
        return loss_fn(model, batch)
    loss_fn = diffusion.loss_fn
    monkeypatch.setattr(diffusion, 'loss_fn', recording_loss)
    argv = [*TINY, '--max-iters', '1', '--eval-iters', '1', '--eval-passes', '1', '--out', 'out/first.pt', '--device', 'cpu']
    diffusion.train(diffusion.parse_args(['--train', *argv]))
    assert 'starting from the GPT of out/gpt.pt' in capsys.readouterr().out
    assert first.keys() == gpt_weights.keys()
    for name, weight in first.items():
        if name == 'wte.weight':
            assert torch.equal(weight[:-1], gpt_weights[name]) and torch.allclose(weight[-1], gpt_weights[name].mean(0))
        else:
            assert torch.equal(weight, gpt_weights[name]), name
    model = diffusion.Transformer(diffusion.Config(**dict(asdict(the_gpt.config), graph='absorb'))).eval()
    model.load_state_dict(first)
    idx, sigma_bar = torch.randint(the_gpt.config.vocab_size, (2, 32)), torch.tensor([0.3, 2.0])
    monkeypatch.setattr(diffusion, 'CAUSAL', True)
    with torch.no_grad():
        log_p = model(idx, sigma_bar) + torch.log(torch.expm1(sigma_bar))[:, None, None]
        assert torch.allclose(log_p, the_gpt.eval()(idx)[:, :-1].log_softmax(-1), atol=1e-5)
    first.clear()
    diffusion.train(diffusion.parse_args(['--train', *argv, '--init', 'none']))
    assert 'starting from random weights' in capsys.readouterr().out
    torch.manual_seed(1337)  # train() draws its initial weights after this seed
    assert all(torch.equal(v, first[k]) for k, v in diffusion.Transformer(model.config).state_dict().items())


def test_init_that_does_not_fit_gives_one_line(trained, tmp_path, monkeypatch, capsys):
    """--init with a GPT of another shape or text, a missing file, or a GPT for the uniform graph: one line that says
    what to do, before any training; nothing is written."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    base = ['--train', *TINY, '--max-iters', '1', '--out', tmp_path / 'd.pt', '--device', 'cpu']
    for extra, needles in ((['--n-embd', '64'], ('another shape', 'python gpt.py --train', '--init none')),
                           (['--init', tmp_path / 'nope.pt'], ('no such checkpoint', '--init none')),
                           (['--init', REPO / 'weights' / 'gpt.pt'], ('another text', 'python gpt.py --train')),
                           (['--graph', 'uniform', '--init', 'out/gpt.pt'], ('only the absorbing graph', '--init none')),
                           (['--init', REPO / 'weights' / 'uniform.pt'], ('another graph', '--init none'))):
        code, _, err = call_main(diffusion, [*base, *extra], monkeypatch, capsys)
        assert_one_error_line(code, err, *needles)
        assert not (tmp_path / 'd.pt').exists()


def test_gpt_key_value_cache_changes_no_token(monkeypatch):
    """gpt.generate with its cache draws the same tokens for the same seed as feeding the whole context at every step,
    through a prompt and restarted contexts (40 characters, context 16). Without its position offset, it does not."""
    monkeypatch.setattr(gpt, 'autocast', lambda device: contextlib.nullcontext())  # float32: bfloat16 rounds the two differently
    torch.manual_seed(0)
    model = gpt.Transformer(tiny_config(gpt)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompt, block = [3, 4, 5], model.config.block_size

    @torch.no_grad()
    def whole_context(n, length):
        x, start = torch.tensor([[0, *prompt]] * n), 0
        for _ in range(length - len(prompt)):
            if x.shape[1] - start > block:
                start = x.shape[1] - block // 2  # a full context: a new one on the last half of the text
            logits = model(x[:, start:])[:, -1]
            x = torch.cat([x, torch.multinomial(F.softmax(logits, -1), 1)], 1)
        return x[:, 1:]
    torch.manual_seed(1)
    cached = gpt.generate(model, 4, 40, prompt=prompt)
    torch.manual_seed(1)
    reference = whole_context(4, 40)
    assert cached.shape == (4, 40) and torch.equal(cached, reference)
    assert len(set(cached.flatten().tolist())) > 5  # real samples, not one token repeated
    rotary = gpt.rotary
    monkeypatch.setattr(gpt, 'rotary', lambda q, k, start=0: rotary(q, k))
    torch.manual_seed(1)
    assert not torch.equal(gpt.generate(model, 4, 40, prompt=prompt), reference)


def test_measure_counts_passes_and_flops():
    """measure: the GPT feeds its prompt once, then one character per pass; diffusion feeds each window at every step;
    FLOPs = 2 x parameters x characters fed."""
    torch.manual_seed(0)
    for module, sample, passes, fed in ((gpt, lambda m: gpt.generate(m, 3, 12, prompt=[1, 2]), 10, 3 + 9),
                                        (diffusion, lambda m: diffusion.generate(m, 3, 23, steps=4), 2 * 5, 2 * 5 * 16)):
        # (the uniform graph feeds every sample at every step; the absorbing one skips some: see below)
        model = module.Transformer(tiny_config(module, **({'graph': 'uniform'} if module is diffusion else {}))).eval()
        x, counted, flops, seconds = module.measure(model, lambda: sample(model))
        assert x.shape[0] == 3 and counted == passes and seconds > 0
        assert flops == 2 * sum(p.numel() for p in model.parameters()) * 3 * fed


def test_get_batch_and_val_windows():
    """Windows hold block_size + EXTRA consecutive characters; validation windows do not overlap."""
    data = np.arange(1000, dtype=np.uint16)
    for module, extra in ((gpt, 1), (diffusion, 0)):
        assert module.EXTRA == extra
        batch = module.get_batch(data, 5, 32, torch.Generator().manual_seed(0))
        assert batch.shape == (5, 32 + extra) and batch.dtype == torch.int64
        assert (batch.diff(dim=1) == 1).all()
        windows = module.val_windows(data, 32)
        assert windows.shape == ((1000 - extra) // 32, 32 + extra)
        assert torch.equal(windows[:, 0], torch.arange(0, 32 * len(windows), 32))


# -----------------------------------------------------------------------------
# fixtures: a tiny prepared text and tiny trained checkpoints, shared by the tests below

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A folder with corpus.txt prepared into data/ by prepare.py (the command line)."""
    d = tmp_path_factory.mktemp('work')
    (d / 'corpus.txt').write_text(corpus())
    res = run('prepare.py', '--input', 'corpus.txt', cwd=d)
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture(scope='module')
def trained(workdir):
    """gpt.py --train and diffusion.py --train, tiny, with the default --out (out/<kind>.pt)."""
    logs = {}
    for script in ('gpt.py', 'diffusion.py'):
        res = run(script, '--train', *TINY, '--max-iters', '30', '--eval-interval', '10', '--device', 'cpu', cwd=workdir)
        assert res.returncode == 0, res.stderr
        logs[script] = res.stdout
    return workdir, logs


# -----------------------------------------------------------------------------
# 5. learning and checkpoints

@pytest.mark.parametrize('module,graph', [(gpt, None), (diffusion, 'uniform'), (diffusion, 'absorb')])
def test_training_lowers_the_loss(module, graph, workdir, tmp_path):
    """train() for 60 steps lowers loss_fn on fixed validation batches, compared with its initial weights."""
    extra = ['--graph', graph] if graph else []
    args = make_args(module, workdir / 'data', tmp_path / 'm.pt', '--max-iters', 60, '--eval-interval', 1000,
                     '--warmup-iters', 5, '--lr', 3e-3, *extra)
    module.train(args)
    trained_model, ckpt = module.load_checkpoint(str(tmp_path / 'm.pt'))
    assert ckpt['step'] == 60 and ckpt['kind'] == module.KIND
    torch.manual_seed(args.seed)  # train() starts from these weights
    initial = module.Transformer(trained_model.config)
    _, split = module.load_data(str(workdir / 'data'))
    g = torch.Generator().manual_seed(123)
    batches = [module.get_batch(split['val'], 16, 32, g) for _ in range(8)]

    def mean_loss(model):
        model.eval()
        torch.manual_seed(0)  # the same t and x_t for both models
        with torch.no_grad():
            return sum(module.loss_fn(model, b).item() for b in batches) / len(batches)
    before, after = mean_loss(initial), mean_loss(trained_model)
    assert after < 0.93 * before, (before, after)  # measured: GPT 0.57, diffusion 0.89


@pytest.mark.parametrize('module,graph', [(gpt, None), (diffusion, 'uniform'), (diffusion, 'absorb')])
def test_checkpoint_round_trip(module, graph, tmp_path):
    """save_checkpoint then load_checkpoint gives a model with identical outputs, and no temp file is left."""
    config = tiny_config(module, **({'graph': graph} if graph else {}))
    torch.manual_seed(1)
    model = module.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the initial weights
    path = tmp_path / 'sub' / 'ckpt.pt'
    plumbing.save_checkpoint(str(path), dict(kind=module.KIND, format=plumbing.FORMAT, config=asdict(config), vocab='abcdefghijk', model=model.state_dict(),
                                           step=7, summary=dict(tokens=0, seconds=0.0)))
    assert os.listdir(path.parent) == ['ckpt.pt']
    loaded, ckpt = module.load_checkpoint(str(path))
    loaded.eval()
    assert loaded.config == config and ckpt['step'] == 7
    idx = torch.randint(11, (2, 16))
    with torch.no_grad():
        if module is gpt:
            assert torch.equal(loaded(idx), model(idx))
        else:
            sigma_bar = torch.tensor([0.5, 3.0])
            assert torch.equal(loaded(idx, sigma_bar), model(idx, sigma_bar))


# -----------------------------------------------------------------------------
# 6. the command lines, end to end

def test_prepare_writes_the_dataset(workdir):
    """prepare.py --input: vocabulary = sorted distinct characters, 90/10 split, ids decode to the text."""
    text = (workdir / 'corpus.txt').read_text()
    vocab, split = gpt.load_data(str(workdir / 'data'))
    assert vocab == ''.join(sorted(set(text)))
    ids = np.concatenate([split['train'], split['val']])
    assert ''.join(vocab[i] for i in ids) == text
    assert len(split['train']) == int(0.9 * len(text))


def samples_of(stdout, n):
    texts = stdout[:-1].split('\n\n' + '-' * 40 + '\n')  # print() adds a newline after each
    assert len(texts) == n, stdout
    return texts


@pytest.mark.parametrize('script', ['gpt.py', 'diffusion.py'])
def test_cli_train_and_sample(script, trained):
    """--train writes out/<kind>.pt; sampling (default checkpoint) prints samples of the right length in the vocabulary."""
    workdir, logs = trained
    kind = script[:-3]
    assert (workdir / 'out' / f'{kind}.pt').exists()
    assert f'saved out/{kind}.pt at step 30' in logs[script]
    vocab = set((workdir / 'corpus.txt').read_text())
    extra = ['--steps', '8'] if kind == 'diffusion' else ['--temperature', '0.8']
    res = run(script, '--num-samples', 2, '--length', 24, '--seed', 3, '--device', 'cpu', *extra, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert f'loaded out/{kind}.pt' in res.stderr
    for text in samples_of(res.stdout, 2):
        assert len(text) == 24 and set(text) <= vocab, repr(text)
    again = run(script, '--num-samples', 2, '--length', 24, '--seed', 3, '--device', 'cpu', *extra, cwd=workdir)
    assert again.stdout == res.stdout  # --seed makes sampling reproducible


@pytest.mark.parametrize('module,passes', [(gpt, 70 - 7), (diffusion, 4 * 5)])
def test_prompt_starts_every_sample(module, passes, trained, monkeypatch, capsys):
    """--prompt: every sample starts with it verbatim. --length 70, beyond the context of 32, gives 70 characters of the
    vocabulary (diffusion: 4 windows of 5 passes). The report on stderr counts the forward passes."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    extra = ['--steps', 4] if module is diffusion else []
    code, out, err = call_main(module, ['--prompt', 'the cat', '--length', 70, '--num-samples', 3, '--device', 'cpu', *extra], monkeypatch, capsys)
    assert code == 0, err
    vocab = set((workdir / 'corpus.txt').read_text())
    for text in samples_of(out, 3):
        assert len(text) == 70 and text.startswith('the cat') and set(text) <= vocab, repr(text)
    assert re.search(rf'^3 x 70 characters in [\d.]+ s, {passes} forward passes, about [\d.e+-]+ GFLOPs$', err, re.M), err


def test_diffusion_sample_follows_the_start_token(trained, monkeypatch, capsys):
    """Without a prompt, a diffusion sample is one context after the GPT's start token (token 0, the line break here),
    as the GPT's samples are: 31 characters in one window (at most steps + 1 passes), the network seeing the start
    token first at every pass. The token itself is not printed."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(diffusion, ['--num-samples', 4, '--steps', 4, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0, err
    assert all(len(text) == 31 for text in samples_of(out, 4)), out
    assert int(re.search(r'(\d+) forward passes', err).group(1)) <= 5, err
    model, _ = diffusion.load_checkpoint('out/diffusion.pt')
    firsts = []
    model.register_forward_hook(lambda _, inputs, out: firsts.append(inputs[0][:, 0]))
    diffusion.generate(model, 2, 31, steps=4)
    assert firsts and all((first == 0).all() for first in firsts)


@pytest.mark.parametrize('hole', ['_', '#'])
def test_infill_keeps_the_template(hole, trained, monkeypatch, capsys):
    """--infill: every character of the template but the holes is kept, and every hole gets a character of the vocabulary."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    template = 'the ___ sat on a ___.\n____ ran'.replace('_', hole)
    code, out, err = call_main(diffusion, ['--infill', template, '--hole', hole, '--num-samples', 4, '--steps', 8, '--device', 'cpu'],
                               monkeypatch, capsys)
    assert code == 0, err
    vocab = set((workdir / 'corpus.txt').read_text())
    for text in samples_of(out, 4):
        assert len(text) == len(template) and set(text) <= vocab, repr(text)
        assert all(c == t for c, t in zip(text, template) if t != hole), repr(text)


def test_visualize_prompt_and_infill(trained, monkeypatch, capsys):
    """visualize.py, piped: with --compare --prompt both texts start with the prompt; with --infill the text keeps the template."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(visualize, ['--compare', '--prompt', 'the dog', '--steps', 4, '--device', 'cpu'], monkeypatch, capsys)
    summary = r'\(\d+ forward passes, about [\d.e+-]+ GFLOPs, [\d.]+ s\)'
    m = re.fullmatch(rf'=== GPT {summary} ===\n(.*)\n\n=== diffusion {summary} ===\n(.*)\n', out, re.S)
    assert code == 0 and m, (out, err)
    assert [len(text) for text in m.groups()] == [32, 31] and all(text.startswith('the dog') for text in m.groups())
    template = 'the cat ___ on a mat.'
    code, out, err = call_main(visualize, ['--infill', template, '--steps', 4, '--device', 'cpu'], monkeypatch, capsys)
    text = out.split('===\n', 1)[1][:-1]
    assert code == 0 and len(text) == len(template), (out, err)
    assert text[:8] == template[:8] and text[11:] == template[11:] and '_' not in text


def test_visualize_shows_the_scripts_own_text(trained, monkeypatch, capsys):
    """Same seed and flags, same text: visualize.py --compare animates exactly what gpt.py and diffusion.py print,
    at a temperature other than 1 too, and a lower temperature changes the text."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    texts = {}
    for extra in ([], ['--temperature', 1], ['--temperature', 0.5], ['--order', 'random'], ['--order', 'left-to-right'],
                  ['--confidence-noise', 0]):
        flags = ['--seed', 7, '--device', 'cpu', *extra]
        code, out, err = call_main(visualize, ['--compare', '--steps', 4, *flags], monkeypatch, capsys)
        assert code == 0, err
        shown = list(re.fullmatch(r'=== GPT \(.*?\) ===\n(.*)\n\n=== diffusion \(.*?\) ===\n(.*)\n', out, re.S).groups())
        gpt_flags = [f for f in flags if f not in ('--order', 'random', 'left-to-right', '--confidence-noise', 0)]
        printed = [call_main(gpt, gpt_flags, monkeypatch, capsys)[1][:-1],
                   call_main(diffusion, ['--steps', 4, *flags], monkeypatch, capsys)[1][:-1]]
        assert shown == printed, (extra, shown, printed)
        texts[' '.join(map(str, extra))] = printed
    assert texts['--temperature 1'] != texts['--temperature 0.5'] and texts['--temperature 1'][1] == texts[''][1]
    assert len({text[1] for text in texts.values()}) == len(texts) - 1  # each other flag changes the diffusion text


@pytest.mark.parametrize('script', ['gpt.py', 'diffusion.py'])
def test_cli_eval_reproduces_the_stored_figure(script, trained):
    """--eval prints a finite loss equal to the one train() stored with the model at the end."""
    workdir, _ = trained
    kind = script[:-3]
    res = run(script, '--eval', *TINY, '--device', 'cpu', cwd=workdir)  # the training's --batch-size 8 (32 gives nan, see below)
    assert res.returncode == 0, res.stderr
    value = float(re.search(r'validation (?:loss|NELBO): (\S+) ', res.stdout).group(1))
    assert math.isfinite(value) and 0 < value < 2 * math.log2(16)
    ckpt = torch.load(workdir / 'out' / f'{kind}.pt', weights_only=True)
    assert abs(ckpt['summary']['val_bpc'] - value) < 1e-3


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_cli_export(module, trained, tmp_path):
    """--export writes a checkpoint without optimizer state that loads and holds the same weights."""
    workdir, _ = trained
    kind = module.KIND
    res = run(f'{kind}.py', '--export', tmp_path / 'shipped.pt', '--device', 'cpu', cwd=workdir)
    assert res.returncode == 0, res.stderr
    exported = torch.load(tmp_path / 'shipped.pt', weights_only=True)
    assert 'optimizer' not in exported and 'raw' not in exported and exported['kind'] == kind
    original = torch.load(workdir / 'out' / f'{kind}.pt', weights_only=True)
    assert exported['model'].keys() == original['model'].keys()
    assert all(torch.equal(exported['model'][k], original['model'][k]) for k in original['model'])
    model, _ = module.load_checkpoint(str(tmp_path / 'shipped.pt'))
    assert model.config == module.Config(**original['config'])


def test_diffusion_saves_the_running_average_of_its_weights(workdir, tmp_path):
    """The diffusion checkpoint's model is the running average of the trained weights (its 'raw'): after one step from
    the initial weights w0 to w1 it is 0.1 w0 + 0.9 w1 (the decay starts at 1/10)."""
    args = make_args(diffusion, workdir / 'data', tmp_path / 'm.pt', '--max-iters', 1, '--eval-interval', 1000)
    diffusion.train(args)
    ckpt = torch.load(tmp_path / 'm.pt', weights_only=True)
    torch.manual_seed(args.seed)  # train() starts from these weights
    initial = diffusion.Transformer(diffusion.Config(**ckpt['config'])).state_dict()
    for name, w1 in ckpt['raw'].items():
        assert not torch.equal(w1, initial[name]), name
        torch.testing.assert_close(ckpt['model'][name], 0.1 * initial[name] + 0.9 * w1)


def compare_args(workdir):
    return ['--compare', '--gpt-ckpt', workdir / 'out' / 'gpt.pt', '--diffusion-ckpt', workdir / 'out' / 'diffusion.pt',
            '--steps', 8, '--length', 32, '--device', 'cpu']


def test_cli_visualize_compare_piped(trained):
    """visualize.py --compare with stdout piped prints both final texts as plain text and exits 0."""
    workdir, _ = trained
    res = run('visualize.py', *compare_args(workdir), cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert '\x1b' not in res.stdout and 'Traceback' not in res.stderr
    m = re.fullmatch(r'=== GPT \(.*?\) ===\n(.*)\n\n=== diffusion \(.*?\) ===\n(.*)\n', res.stdout, re.S)
    assert m, res.stdout
    vocab = set((workdir / 'corpus.txt').read_text())
    for text in m.groups():
        assert len(text) == 32 and set(text) <= vocab, repr(text)


def run_in_terminal(argv, cwd, interrupt_at=None):
    """Run visualize.py in a pseudo-terminal and return (all it drew, the offset where Ctrl-C was sent, the process).
    With interrupt_at, Ctrl-C is sent once those bytes have been drawn."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / 'visualize.py'), *map(str, argv)],
                            cwd=cwd, env=dict(ENV, COLUMNS='100', LINES='40', TERM='xterm'),
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    screen, interrupted = b'', None
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            assert ready, 'visualize.py stalled'
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if interrupt_at and interrupted is None and interrupt_at in screen:
                interrupted = len(screen)
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return screen, interrupted, proc


@pytest.mark.skipif(sys.platform == 'win32', reason='needs a pseudo-terminal')
def test_cli_visualize_no_color_in_a_terminal(trained):
    """In a terminal, visualize.py animates (cursor movements); --no-color leaves out the colour codes."""
    workdir, _ = trained
    screen, _, proc = run_in_terminal([*compare_args(workdir), '--no-color', '--delay', '0'], workdir)
    assert proc.returncode == 0, proc.stderr.read()
    screen = screen.decode('utf-8', 'replace')
    assert '\x1b[K' in screen and 'step' in screen  # it did draw frames in place
    colours = set(re.findall(r'\x1b\[[0-9;]*m', screen))
    assert colours <= {'\x1b[0m'}, colours  # at most the final reset


# -----------------------------------------------------------------------------
# 7. the code gpt.py and diffusion.py share

EXPECTED_DIFFERENCES = {
    'KIND': "'gpt' vs 'diffusion'",
    'defaults': 'diffusion adds graph, no dropout, more steps at a lower learning rate',
    'EXTRA': 'a GPT window holds one more character, the target of the last position',
    'Config': 'diffusion adds graph',
    'CAUSAL': 'the GPT masks the future, the denoiser sees the whole sequence',
    'SelfAttention': 'the GPT keeps a key/value cache while sampling; the denoiser sees a new sequence at every step',
    'Transformer': "diffusion: mask token, the uniform graph's noise-level input, concrete-score output",
    'loss_fn': 'cross-entropy vs diffusion-weighted score entropy',
    'train': 'diffusion keeps a running average of the weights, and saves both',
    'evaluate': 'diffusion: repeated passes over random noise levels',
    'generate': 'left to right with a key/value cache vs Tweedie denoising steps with given characters',
    'main': 'generate is called with a prompt vs steps and given characters',
}
DIFFUSION_ONLY = {'EMA_DECAY', 'SIGMA_MIN', 'SIGMA_MAX', 'T_EPS', 'noise', 'noise_features', 'forward_probs', 'perturb',
                  'score_entropy', 'tweedie_probs', 'reveal'}


def top_level_definitions(path):
    """{name: source} of the module's top-level functions, classes (with decorators) and assignments."""
    src = path.read_text()
    defs = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = ''.join('@' + ast.get_source_segment(src, d) + '\n' for d in node.decorator_list) + ast.get_source_segment(src, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs[name.id] = ast.get_source_segment(src, node)
    return defs


def test_shared_definitions_are_identical():
    """Every definition in both files is character-for-character identical, except the listed, real differences."""
    g, d = top_level_definitions(REPO / 'gpt.py'), top_level_definitions(REPO / 'diffusion.py')
    assert set(g) - set(d) == set(), 'gpt.py defines names diffusion.py lacks'
    assert set(d) - set(g) == DIFFUSION_ONLY
    differing = {name for name in set(g) & set(d) if g[name] != d[name]}
    unexpected = differing - set(EXPECTED_DIFFERENCES)
    assert not unexpected, f'shared code drifted apart: {sorted(unexpected)}'
    stale = set(EXPECTED_DIFFERENCES) - differing
    assert not stale, f'now identical, remove from EXPECTED_DIFFERENCES: {sorted(stale)}'
    assert len(set(g) & set(d)) - len(differing) >= 10  # most of the code is shared


# -----------------------------------------------------------------------------
# 8. robustness: bad input gives one clear line, never a traceback

class Payload:
    """A pickle that runs code when loaded without weights_only: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("pwned")',)


def test_code_carrying_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    """A checkpoint whose pickle carries code is refused with one line, and the code never runs."""
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pt'
    torch.save({'kind': 'gpt', 'model': Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    res = run('gpt.py', '--ckpt', path, '--device', 'cpu', cwd=tmp_path)
    assert_one_error_line(res.returncode, res.stderr, str(path))
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(*call_main(diffusion, ['--ckpt', path, '--device', 'cpu'], monkeypatch, capsys)[::2], str(path))
    assert not marker.exists()


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_damaged_checkpoints_give_one_line(module, trained, tmp_path, monkeypatch, capsys):
    """A truncated checkpoint, random bytes and a checkpoint of the other model each give one clear line."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    good = (workdir / 'out' / f'{module.KIND}.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(good[:len(good) // 2])
    (tmp_path / 'random.pt').write_bytes(np.random.default_rng(0).bytes(5000))
    for name in ('truncated.pt', 'random.pt'):
        code, _, err = call_main(module, ['--ckpt', name, '--device', 'cpu'], monkeypatch, capsys)
        assert_one_error_line(code, err, name)
    other = diffusion if module is gpt else gpt
    code, _, err = call_main(module, ['--ckpt', workdir / 'out' / f'{other.KIND}.pt', '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, f'{other.KIND}.py')


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_missing_weights_and_data_are_explained(module, tmp_path, monkeypatch, capsys):
    """Sampling in an empty folder names the missing file and the train command; training without data names prepare.py."""
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(module, ['--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, module.SHIPPED, f'python {module.KIND}.py --train')
    code, _, err = call_main(module, ['--train', *TINY, '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, 'prepare.py')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('case', ['missing', 'directory', 'empty', 'not-utf8', 'too-short'])
def test_prepare_rejects_bad_input(case, tmp_path, monkeypatch, capsys):
    """prepare.py --input with an unusable file: one line, exit 2, and no data files written."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'input.txt'
    if case == 'directory':
        path.mkdir()
    elif case == 'empty':
        path.write_text('')
    elif case == 'not-utf8':
        path.write_bytes(corpus().encode('utf-8') + b'\xff\xfe caf\xe9')
    elif case == 'too-short':
        path.write_text(corpus(1000))
    code, _, err = call_main(prepare, ['--input', path, '--out-dir', 'data'], monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, err)
    assert not (tmp_path / 'data').exists() or not os.listdir(tmp_path / 'data')


BAD_ARGS = {
    gpt: [['--num-samples', '0'], ['--length', '0'], ['--length', '1000001'], ['--temperature', '0'], ['--temperature', '-1'], ['--device', 'tpu'],
          ['--device', 'cuda'], ['--max-iters', '0'], ['--batch-size', '0'], ['--grad-accum', '0']],
    diffusion: [['--num-samples', '0'], ['--length', '0'], ['--length', '1000001'], ['--steps', '0'], ['--eval-passes', '0'], ['--temperature', '0'], ['--device', 'tpu'],
                ['--device', 'cuda'], ['--graph', 'foo'], ['--max-iters', '0'], ['--order', 'foo'], ['--confidence-noise', '-1'],
                ['--confidence-noise', 'nan'], ['--confidence-noise', 'inf'], ['--order', 'confidence', '--graph', 'uniform'],
                ['--order', 'left-to-right', '--graph', 'uniform', '--train']],
}
# every float flag must be finite and inside its range, and a few integers have a floor too
for _module in (gpt, diffusion):
    BAD_ARGS[_module] += [['--lr', 'nan'], ['--lr', '0'], ['--lr', 'inf'], ['--min-lr', '-0.0001'], ['--min-lr', '0.5'],
                          ['--temperature', 'nan'], ['--temperature', 'inf'], ['--temperature', '1e-05'], ['--dropout', '1'], ['--dropout', '-0.1'],
                          ['--weight-decay', 'nan'], ['--weight-decay', '-1'], ['--grad-clip', '0'], ['--grad-clip', 'inf'],
                          ['--warmup-iters', '-1'], ['--seed', '-1']]


@pytest.mark.parametrize('module,argv', [(m, a) for m, cases in BAD_ARGS.items() for a in cases],
                         ids=lambda v: v.KIND if hasattr(v, 'KIND') else ' '.join(v))
def test_bad_arguments_give_one_line(module, argv, capsys):
    """Each bad argument is refused by parse_args with one 'error:' line naming the flag (and, for a number,
    the value and the range allowed)."""
    if argv == ['--device', 'cuda'] and torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    line = assert_one_error_line(e.value.code, capsys.readouterr().err, argv[0])
    if argv[0] in ('--lr', '--temperature', '--dropout', '--weight-decay', '--grad-clip', '--confidence-noise'):
        assert argv[1] in line and ('(' in line or '[' in line), line


@pytest.mark.parametrize('script,argv', [('gpt.py', ['--prompt', 'the Zoo\tcafé']), ('diffusion.py', ['--infill', 'the Z__\tcafé'])],
                         ids=['gpt', 'diffusion'])
def test_unknown_characters_are_listed(script, argv, trained):
    """A prompt or template with characters the model does not know: one line listing each of them, once (a real
    process, so a traceback would show)."""
    workdir, _ = trained
    res = run(script, *argv, '--device', 'cpu', cwd=workdir)
    line = assert_one_error_line(res.returncode, res.stderr, argv[0], "'\\t' 'Z' 'f' 'é'")
    assert line.count("'Z'") == 1 and res.stdout == ''


BAD_CONDITIONING = [  # the tiny models know 'the cat sat on a mat...' and have a context of 32
    pytest.param(gpt, ['--prompt', 'a' * 33], ['--prompt has 33 characters', 'context of 32'], id='gpt-prompt-beyond-context'),
    pytest.param(diffusion, ['--prompt', 'a' * 33], ['--prompt has 33 characters', 'context of 32'], id='diffusion-prompt-beyond-context'),
    pytest.param(gpt, ['--prompt', 'the cat', '--length', 5], ['--prompt has 7 characters', '--length 5'], id='gpt-prompt-beyond-length'),
    pytest.param(diffusion, ['--prompt', 'the cat', '--length', 5], ['--prompt has 7 characters', '--length 5'], id='diffusion-prompt-beyond-length'),
    pytest.param(diffusion, ['--infill', 'the ' + '_' * 29], ['--infill has 33 characters', 'context of 32'], id='infill-beyond-context'),
    pytest.param(diffusion, ['--infill', 'the cat'], ['--infill has no', '--hole'], id='infill-without-hole'),
    pytest.param(diffusion, ['--infill', 'the c t', '--hole', ' '], ["--hole ' '", 'does not know'], id='hole-in-vocabulary'),
    pytest.param(diffusion, ['--infill', 'the c##', '--hole', '##'], ["--hole '##'", 'single character'], id='hole-of-two-characters'),
    pytest.param(diffusion, ['--infill', 'the c__', '--prompt', 'the'], ['--infill', '--prompt'], id='infill-with-prompt'),
    pytest.param(diffusion, ['--infill', 'the c__', '--length', 7], ['--infill', '--length'], id='infill-with-length'),
    pytest.param(visualize, ['--infill', 'the c__', '--compare'], ['--infill', '--compare'], id='visualize-infill-with-compare'),
    pytest.param(visualize, ['--infill', 'the c__', '--benchmark'], ['--infill', '--benchmark'], id='visualize-infill-with-benchmark'),
    pytest.param(visualize, ['--prompt', 'the', '--benchmark'], ['--prompt', '--benchmark'], id='visualize-prompt-with-benchmark'),
    pytest.param(visualize, ['--temperature', '0.8', '--benchmark'], ['--temperature', '--benchmark'], id='visualize-temperature-with-benchmark'),
    pytest.param(visualize, ['--order', 'random', '--benchmark'], ['--order', '--benchmark'], id='visualize-order-with-benchmark'),
    pytest.param(visualize, ['--order', 'confidence', '--diffusion-ckpt', str(REPO / 'weights' / 'uniform.pt')], ['--order', 'uniform'],
                 id='visualize-order-with-uniform'),
    pytest.param(visualize, ['--prompt', 'the Zoo', '--compare'], ["'Z'"], id='visualize-unknown-characters'),
    pytest.param(visualize, ['--infill', 'the c__', '--hole', 'a'], ["--hole 'a'"], id='visualize-hole-in-vocabulary'),
]


@pytest.mark.parametrize('module,argv,needles', BAD_CONDITIONING)
def test_bad_prompts_and_templates_give_one_line(module, argv, needles, trained, monkeypatch, capsys):
    """Each prompt, template or hole that cannot work is refused with one line naming it, and no sample is printed."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(module, [*argv, '--steps' if module is not gpt else '--seed', 2, '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)
    assert out == ''


@pytest.mark.parametrize('module', [gpt, diffusion])
@pytest.mark.parametrize('bad', [
    pytest.param(['--block-size', '512'], id='block-size-longer-than-data'),
    pytest.param(['--n-head', '3'], id='n-head-not-dividing-n-embd'),
    pytest.param(['--eval-interval', '0'], id='eval-interval-0'),
    pytest.param(['--eval-iters', '0'], id='eval-iters-0'),
    pytest.param(['--out', 'a-file/model.pt'], id='out-under-a-file'),
    pytest.param(['--out', 'a-folder'], id='out-a-folder'),
    pytest.param(['--batch-size', '100000000'], id='batch-beyond-memory'),
    pytest.param(['--n-embd', '200000'], id='model-beyond-memory'),
])
def test_bad_training_settings_give_one_line(module, bad, workdir, tmp_path, monkeypatch, capsys):
    """Training settings that cannot work are refused with one 'error:' line naming the flag, before the first
    step (an --out that cannot be written is not found only at the first save), leaving no file behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a-file').write_text('not a folder')
    (tmp_path / 'a-folder').mkdir()
    argv = ['--train', *TINY, '--max-iters', '3', '--eval-interval', '2', '--data-dir', workdir / 'data', '--device', 'cpu', *bad]
    code, out, err = call_main(module, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, bad[0], *(['memory'] if bad[0] in ('--batch-size', '--n-embd') else []))
    assert 'step ' not in out and sorted(os.listdir(tmp_path)) == ['a-file', 'a-folder']
    assert os.listdir(tmp_path / 'a-folder') == []


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_evaluate_is_finite_on_a_small_validation_split(module, workdir, capsys):
    """evaluate() gives a finite figure on any text prepare.py accepts, whatever --batch-size (default 32)."""
    args = module.parse_args(['--data-dir', str(workdir / 'data'), '--block-size', '32', '--device', 'cpu'])
    _, split = module.load_data(args.data_dir)
    assert len(module.val_windows(split['val'], 32)) < args.batch_size  # the case in question
    torch.manual_seed(0)
    model = module.Transformer(tiny_config(module, vocab_size=len(module.load_data(args.data_dir)[0]), block_size=32))
    assert math.isfinite(module.evaluate(model, args))


def test_prepare_out_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    """prepare.py --out-dir naming an existing file: one error line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'corpus.txt').write_text(corpus())
    (tmp_path / 'data').write_text('not a folder')
    assert_one_error_line(*call_main(prepare, ['--input', 'corpus.txt'], monkeypatch, capsys)[::2], 'data')


def test_prepare_vocabulary_limit_is_uint16(tmp_path, monkeypatch, capsys):
    """prepare.py keeps 65,536 distinct characters (ids 0..65535) and refuses 65,537 with one line, writing nothing."""
    monkeypatch.chdir(tmp_path)
    chars = [chr(c) for c in range(0x10000, 0x10000 + 65537)]  # outside the BMP: no surrogates, all valid UTF-8
    (tmp_path / 'wide.txt').write_text(''.join(chars), encoding='utf-8')
    code, _, err = call_main(prepare, ['--input', 'wide.txt', '--out-dir', 'wide'], monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, err, '65,537 distinct characters')
    assert not (tmp_path / 'wide').exists()
    (tmp_path / 'full.txt').write_text(''.join(chars[:65536]), encoding='utf-8')
    code, _, err = call_main(prepare, ['--input', 'full.txt', '--out-dir', 'full'], monkeypatch, capsys)
    assert code == 0, err
    vocab, split = gpt.load_data('full')
    ids = np.concatenate([split['train'], split['val']])
    assert len(vocab) == 65536 and ids.max() == 65535 and ''.join(vocab[i] for i in ids) == ''.join(chars[:65536])


class FakeResponse:
    """What requests.get returns: a body and a status that raise_for_status turns into an HTTPError."""

    def __init__(self, content=b'', status_code=200):
        self.content, self.status_code = content, status_code

    def raise_for_status(self):
        if self.status_code >= 400:
            raise prepare.requests.HTTPError(f'{self.status_code} Client Error: Not Found', response=self)


@pytest.mark.parametrize('outcome,needles', [
    pytest.param(prepare.requests.ConnectionError('Failed to establish a new connection'), ['could not download', 'ConnectionError'],
                 id='no-network'),
    pytest.param(prepare.requests.Timeout('Read timed out'), ['could not download', 'Timeout'], id='timeout'),
    pytest.param(FakeResponse(status_code=404), ['could not download', 'HTTPError'], id='http-error'),
    pytest.param(FakeResponse(b'First Citizen:\nBefore we proceed any further, hear me speak.\n'), ['incomplete or altered'],
                 id='truncated'),
])
def test_prepare_download_failures_give_one_line(outcome, needles, tmp_path, monkeypatch, capsys):
    """A failed or altered download (requests.get faked, no network) gives one line pointing to --input; nothing is written."""
    monkeypatch.chdir(tmp_path)
    urls = []

    def fake_get(url, **kwargs):
        urls.append(url)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    monkeypatch.setattr(prepare.requests, 'get', fake_get)
    code, _, err = call_main(prepare, [], monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, err, *needles, 'python prepare.py --input FILE')
    assert urls == [prepare.URL]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_resume_on_another_vocabulary_is_refused(module, trained, tmp_path, monkeypatch, capsys):
    """--train --resume on a data/ of another vocabulary: one line naming the vocabulary, the checkpoint left unchanged."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'shouting.txt').write_text(corpus().upper())  # as many characters, other ones
    assert call_main(prepare, ['--input', 'shouting.txt', '--out-dir', 'other'], monkeypatch, capsys)[0] == 0
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes((workdir / 'out' / f'{module.KIND}.pt').read_bytes())
    before, mtime = ckpt.read_bytes(), ckpt.stat().st_mtime_ns
    argv = ['--train', '--resume', *TINY, '--max-iters', '40', '--eval-interval', '1', '--data-dir', 'other', '--out', ckpt, '--device', 'cpu']
    code, _, err = call_main(module, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, 'another vocabulary', 'ckpt.pt')
    assert ckpt.read_bytes() == before and ckpt.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'other', 'shouting.txt']  # no temp file either


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_resume_of_exported_checkpoint_is_refused(module, trained, tmp_path, monkeypatch, capsys):
    """--resume from a checkpoint made by --export (as the shipped weights are): no optimizer state to continue
    from, so one line saying to train afresh, and the file left as it was."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    exported = tmp_path / 'exported.pt'
    code, _, _ = call_main(module, ['--ckpt', workdir / 'out' / f'{module.KIND}.pt', '--export', exported, '--device', 'cpu'],
                           monkeypatch, capsys)
    assert code == 0
    before = exported.read_bytes()
    argv = ['--train', '--resume', *TINY, '--max-iters', '40', '--data-dir', workdir / 'data', '--out', exported, '--device', 'cpu']
    code, _, err = call_main(module, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, 'exported.pt has no training state', 'without --resume')
    assert exported.read_bytes() == before
    assert os.listdir(tmp_path) == ['exported.pt']


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_foreign_file_is_not_a_checkpoint(module, tmp_path, monkeypatch, capsys):
    """A file torch loads but that is not one of this project's checkpoints (a tensor, a dict without 'kind'): one line."""
    monkeypatch.chdir(tmp_path)
    torch.save(torch.zeros(3, 4), tmp_path / 'tensor.pt')
    torch.save({'model': {'w': torch.zeros(2)}, 'step': 3}, tmp_path / 'no-kind.pt')
    torch.save([1, 2, 3], tmp_path / 'list.pt')
    for name in ('tensor.pt', 'no-kind.pt', 'list.pt'):
        code, _, err = call_main(module, ['--ckpt', name, '--device', 'cpu'], monkeypatch, capsys)
        assert_one_error_line(code, err, f'{name} is not a checkpoint of this project', f'python {module.KIND}.py --train')


def other_version(ckpt, case):
    """The checkpoint as a different config or an older or newer version of the code would have written it."""
    if case == 'wider':
        ckpt['config']['n_embd'] *= 2
    elif case == 'unknown-config-key':
        ckpt['config']['n_expert'] = 4
    elif case == 'renamed-weight':
        ckpt['model']['lm_head.weight'] = ckpt['model'].pop('head.weight')
    elif case == 'no-config':
        del ckpt['config']
    return ckpt


@pytest.mark.parametrize('module', [gpt, diffusion])
@pytest.mark.parametrize('case', ['wider', 'unknown-config-key', 'renamed-weight', 'no-config'])
def test_checkpoint_of_another_version_is_refused(case, module, trained, tmp_path, monkeypatch, capsys):
    """A checkpoint whose config or weights do not fit this code's Transformer: one line 'does not match this version'."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    ckpt = torch.load(workdir / 'out' / f'{module.KIND}.pt', weights_only=True)
    torch.save(other_version(ckpt, case), tmp_path / 'old.pt')
    code, _, err = call_main(module, ['--ckpt', 'old.pt', '--length', '8', '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, f'old.pt does not match this version of {module.KIND}.py')


def cpu_seconds(pid):
    """User + system CPU time of a running process, from /proc/PID/stat (Linux)."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def wait_for_cpu(proc, seconds, timeout=300):
    """Wait until proc has used `seconds` more CPU time: on a busy machine wall time says little."""
    start, deadline = cpu_seconds(proc.pid), time.time() + timeout
    while cpu_seconds(proc.pid) < start + seconds and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)


SAMPLE_LONG = {'gpt.py': ['--length', 10 ** 6],  # a million forward passes
               'diffusion.py': ['--steps', 100000, '--length', 32]}  # 100,001 forward passes


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads CPU time from /proc')
@pytest.mark.parametrize('script', ['gpt.py', 'diffusion.py'])
def test_ctrl_c_while_sampling_exits_quietly(script, trained, tmp_path):
    """Ctrl-C in the middle of sampling exits 0, with no traceback and no partial samples."""
    workdir, _ = trained
    with open(tmp_path / 'stdout', 'w') as stdout:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, SAMPLE_LONG[script]), '--device', 'cpu'],
                                cwd=workdir, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        err = proc.stderr.readline()  # 'loaded ...', printed after loading, just before sampling starts
        assert err.startswith('loaded '), err + proc.stderr.read()
        wait_for_cpu(proc, 0.3)  # well into generate()
        assert proc.poll() is None, 'sampling ended before Ctrl-C: ' + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        err += proc.stderr.read()  # through the same reader: communicate() would miss what readline() buffered
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert 'Traceback' not in err and 'characters in' not in err, err
    assert (tmp_path / 'stdout').read_text() == ''


@pytest.mark.parametrize('argv', [['gpt.py', *SAMPLE_LONG['gpt.py']], ['diffusion.py', *SAMPLE_LONG['diffusion.py']],
                                  ['diffusion.py', '--eval'], ['gpt.py', '--train', *TINY, '--max-iters', 10 ** 6],
                                  ['visualize.py', '--compare', '--steps', 100000, '--length', 32]], ids=lambda a: ' '.join(map(str, a[:2])))
def test_ctrl_c_while_starting_exits_quietly(argv, trained):
    """Ctrl-C after a fifth of a second of the child's CPU time, while Python still imports torch (or, on a fast
    machine, a little later): exit 0, no traceback, no text."""
    workdir, _ = trained
    proc = subprocess.Popen([sys.executable, str(REPO / argv[0]), *map(str, argv[1:]), '--device', 'cpu'], cwd=workdir, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_cpu(proc, 0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and 'Traceback' not in err, err
    assert out == '' or argv[1] == '--train', out  # training that got going saves and says so on stdout


def test_ctrl_c_in_prepare_writes_all_or_nothing(tmp_path):
    """Ctrl-C at several moments of prepare.py: exit 0, no traceback, and data/ holds all three files, consistent with
    each other, or nothing."""
    (tmp_path / 'corpus.txt').write_text(corpus(200_000))
    for delay in (0.08, 0.1, 0.2, 0.3, 0.4):  # seconds of the child's CPU time: a busy machine does not shift them
        out_dir = tmp_path / f'data{delay}'
        proc = subprocess.Popen([sys.executable, str(REPO / 'prepare.py'), '--input', 'corpus.txt', '--out-dir', out_dir], cwd=tmp_path,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_cpu(proc, delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert 'Traceback' not in err, err
        # exit 0; or, when Ctrl-C lands as Python shuts down after the work is done (it then gives SIGINT its
        # default action back), ended by the signal with nothing on stderr
        done = 'tokens ->' in out
        assert proc.returncode == 0 or (proc.returncode == -signal.SIGINT and done and err == ''), (proc.returncode, err)
        files = sorted(os.listdir(out_dir)) if out_dir.exists() else []
        assert files in ([], ['meta.json', 'train.bin', 'val.bin']), files
        if files:
            meta = json.loads((out_dir / 'meta.json').read_text())
            assert (out_dir / 'train.bin').stat().st_size == 2 * meta['n_train'] and (out_dir / 'val.bin').stat().st_size == 2 * meta['n_val']


@pytest.mark.skipif(sys.platform == 'win32', reason='needs a pseudo-terminal')
def test_ctrl_c_in_visualize_ends_the_show(trained):
    """Ctrl-C while visualize.py samples in a terminal exits 0, with no traceback, and gives the cursor back."""
    workdir, _ = trained
    screen, interrupted, proc = run_in_terminal(['--diffusion-ckpt', workdir / 'out' / 'diffusion.pt', '--steps', '100000', '--length', '32',
                                                 '--delay', '0', '--device', 'cpu'], workdir, interrupt_at=b'sampling with the diffusion model')
    err = proc.stderr.read().decode()
    assert interrupted is not None and proc.returncode == 0, err
    assert 'Traceback' not in err, err
    after = screen[interrupted:].decode('utf-8', 'replace')
    assert 'step ' not in after and visualize.SHOW_CURSOR in after  # no frame was drawn; the cursor is back


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_training_leaves_shipped_weights_alone(module, trained, tmp_path, monkeypatch, capsys):
    """--train with the default --out writes out/<kind>.pt and leaves weights/<kind>.pt byte for byte as it was."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / module.SHIPPED
    shipped.parent.mkdir()
    shipped.write_bytes((workdir / 'out' / f'{module.KIND}.pt').read_bytes())
    before, mtime = shipped.read_bytes(), shipped.stat().st_mtime_ns
    argv = ['--train', *TINY, '--max-iters', '2', '--eval-interval', '1', '--data-dir', workdir / 'data', '--device', 'cpu',
            *INIT[module]]
    code, out, err = call_main(module, argv, monkeypatch, capsys)
    assert code == 0, err
    assert shipped.read_bytes() == before and shipped.stat().st_mtime_ns == mtime
    assert os.listdir(shipped.parent) == [shipped.name]
    assert torch.load(tmp_path / 'out' / f'{module.KIND}.pt', weights_only=True)['step'] == 2
    assert f'saved out/{module.KIND}.pt at step 2' in out


@pytest.mark.parametrize('module', [gpt, diffusion])
@pytest.mark.parametrize('damage', ['meta-not-json', 'meta-without-vocab', 'train-missing', 'val-truncated'])
def test_damaged_data_gives_one_line(module, damage, trained, tmp_path, monkeypatch, capsys):
    """A data/ folder that prepare.py did not leave like this (a damaged meta.json, a .bin missing or cut short) is
    named in one line with the command that makes it again, for training and for --eval alike."""
    workdir, _ = trained
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('meta.json', 'train.bin', 'val.bin'):
        (data / name).write_bytes((workdir / 'data' / name).read_bytes())
    if damage == 'meta-not-json':
        (data / 'meta.json').write_text('{"vocab": "ab')
    elif damage == 'meta-without-vocab':
        (data / 'meta.json').write_text('{"n_train": 3, "n_val": 3}')
    elif damage == 'train-missing':
        (data / 'train.bin').unlink()
    else:
        (data / 'val.bin').write_bytes((data / 'val.bin').read_bytes()[:-2])
    monkeypatch.chdir(tmp_path)
    for argv in (['--train', *TINY, '--max-iters', 2], ['--eval', '--ckpt', workdir / 'out' / f'{module.KIND}.pt']):
        code, out, err = call_main(module, [*argv, '--data-dir', data, '--device', 'cpu'], monkeypatch, capsys)
        assert_one_error_line(code, err, 'data', 'python prepare.py')
        assert 'step' not in out and sorted(os.listdir(tmp_path)) == ['data']


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_samples_beyond_memory_give_one_line(module, trained, monkeypatch, capsys):
    """Asking for more samples than memory holds: one line naming the memory needed, before anything is allocated;
    and should the allocator still fail while sampling, one line too, not its traceback."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(module, ['--num-samples', 10 ** 9, '--length', 32, '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, '1000000000 samples', 'GB of memory', '--num-samples')
    assert out == ''

    def failing(*args, **kwargs):
        raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to '
                           'allocate 123456789 bytes.')
    monkeypatch.setattr(module, 'generate', failing)
    code, out, err = call_main(module, ['--length', 8, '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, 'out of memory', '--num-samples')
    assert out == ''


def test_too_long_sample_is_refused_by_visualize(trained, monkeypatch, capsys):
    """visualize.py draws one context: --length beyond it (32) is refused with one line; exactly the context is fine."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    for argv in (['--length', 33], ['--compare', '--length', 33], ['--benchmark', '--length', 33]):
        code, _, err = call_main(visualize, [*argv, '--steps', 4, '--device', 'cpu'], monkeypatch, capsys)
        assert_one_error_line(code, err, '--length 33', '.pt (32 characters)')
    code, out, err = call_main(visualize, ['--length', 32, '--steps', 4, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0 and len(out.split('===\n', 1)[1]) == 33, err  # 32 characters and print's newline


@pytest.mark.parametrize('argv', [['--steps', '0'], ['--temperature', '0'], ['--length', '0'], ['--device', 'tpu'], ['--device', 'cuda'],
                                  ['--order', 'foo'], ['--confidence-noise', '-1'], ['--confidence-noise', 'nan'],
                                  ['--confidence-noise', 'inf']], ids=' '.join)
def test_visualize_bad_arguments_give_one_line(argv, capsys):
    """visualize.parse_args refuses each bad argument with one 'error:' line naming it."""
    if argv == ['--device', 'cuda'] and torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    with pytest.raises(SystemExit) as e:
        visualize.parse_args(argv)
    assert_one_error_line(e.value.code, capsys.readouterr().err, argv[0].lstrip('-'))


@pytest.mark.parametrize('module,bad', [(gpt, math.nan), (diffusion, math.nan), (gpt, math.inf)], ids=['gpt-nan', 'diffusion-nan', 'gpt-inf'])
def test_nan_loss_stops_training_and_keeps_the_checkpoint(module, bad, workdir, tmp_path, monkeypatch, capsys):
    """A training loss that turns nan or inf stops with one line naming the step; the last checkpoint stays as it was."""
    out, real, seen = tmp_path / 'm.pt', module.loss_fn, {}

    def diverging(model, batch):
        loss = real(model, batch)
        if torch.is_grad_enabled():  # a training step, not estimate_loss
            seen['steps'] = seen.get('steps', 0) + 1
            if seen['steps'] == 4:
                seen['saved'] = out.read_bytes()  # the checkpoint of step 3, saved just before
                return loss * bad
        return loss
    monkeypatch.setattr(module, 'loss_fn', diverging)
    monkeypatch.chdir(tmp_path)
    argv = ['--train', *TINY, '--max-iters', '10', '--eval-interval', '1', '--data-dir', workdir / 'data', '--out', out, '--device', 'cpu',
            *INIT[module]]
    code, _, err = call_main(module, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, err, f'loss became {bad} at step 3', '--lr')
    assert seen['steps'] == 4 and out.read_bytes() == seen['saved']
    assert os.listdir(tmp_path) == ['m.pt']
    ckpt = torch.load(out, weights_only=True)
    assert ckpt['step'] == 3 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


@pytest.mark.parametrize('module', [gpt, diffusion])
def test_checkpoint_saved_mid_training_loads(module, workdir, tmp_path, monkeypatch, capsys):
    """A checkpoint saved before --max-iters (here by Ctrl-C at step 2) loads, and --resume continues from it."""
    real, seen = module.loss_fn, []

    def interrupting(model, batch):
        if torch.is_grad_enabled():
            seen.append(1)
            if len(seen) == 2:
                signal.raise_signal(signal.SIGINT)  # train()'s handler: finish this step, save, stop
        return real(model, batch)
    monkeypatch.setattr(module, 'loss_fn', interrupting)
    monkeypatch.chdir(tmp_path)
    argv = ['--train', *TINY, '--max-iters', '4', '--eval-interval', '100', '--data-dir', workdir / 'data', '--out', 'm.pt', '--device', 'cpu',
            *INIT[module]]
    code, out, err = call_main(module, argv, monkeypatch, capsys)
    assert code == 0 and 'interrupted; saved m.pt at step 2' in out, err
    assert module.load_checkpoint('m.pt')[1]['step'] == 2
    code, out, err = call_main(module, [*argv, '--resume'], monkeypatch, capsys)
    assert code == 0 and 'resuming m.pt from step 2' in out, err


def test_benchmark_refuses_mismatched_vocabularies(trained, tmp_path, monkeypatch, capsys):
    """visualize.py --benchmark with a GPT and a diffusion model of different vocabularies: one error line."""
    workdir, _ = trained
    monkeypatch.chdir(tmp_path)
    ckpt = torch.load(workdir / 'out' / 'gpt.pt', weights_only=True)
    ckpt['vocab'] = ckpt['vocab'].upper()  # the same size, other characters
    torch.save(ckpt, tmp_path / 'upper.pt')
    argv = ['--benchmark', '--gpt-ckpt', 'upper.pt', '--diffusion-ckpt', workdir / 'out' / 'diffusion.pt', '--length', 16, '--device', 'cpu']
    code, out, err = call_main(visualize, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, 'different vocabularies', '--gpt-ckpt', '--diffusion-ckpt')
    assert out == ''  # no table was started


def test_benchmark_scores_samples_and_held_out_text(trained, monkeypatch, capsys):
    """--benchmark prints a row per sampler, then held-out text scored the same way: the GPT's bits/char on it agree
    with its validation loss from training (which scores all of data/val.bin by another path), and most of its
    words are words of the training text."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(visualize, ['--benchmark', '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0, err
    rows = [line.strip('| ').split(' | ') for line in out.splitlines()[2:]]
    names = [r[0] for r in rows]
    gpt_t = gpt.defaults['temperature']
    assert names[:len({gpt_t, 1})] == [f'GPT, temperature {t}{" (default)" * (t == gpt_t)}, key/value cache'
                                       for t in sorted({gpt_t, 1}, reverse=True)]
    exact = [f'diffusion, {n} steps, temperature 1, random order (the exact model)' for n in (16, 32, 64, 128, 256, 1024)]
    assert names[len({gpt_t, 1}):][:6] == exact and names[-1] == 'held-out text (data/val.bin), for reference'
    # then every order at the defaults, one character a step, and a sweep of the confidence noise
    t, order, noise = (diffusion.defaults[k] for k in ('temperature', 'order', 'confidence_noise'))
    others = names[len({gpt_t, 1}) + 6:-1]
    assert f'diffusion, 128 steps, temperature {t}, left-to-right order' in others
    assert f'diffusion, 31 steps, temperature {t}, left-to-right order, one character a step' in others
    for tau in (0.0, 1.0, 3.0, 10.0):
        assert any(n.startswith(f'diffusion, 128 steps, temperature {t}, confidence order, confidence noise {tau}')
                   for n in others), (tau, others)
    defaults = [n for n in names if n.endswith('(default)') and n.startswith('diffusion')]
    assert len(defaults) == 1 and f'{order} order' in defaults[0]
    # the absorbing sampler runs the network only when a step changed a character: at most once per character
    passes = {r[0]: int(r[1]) for r in rows[:-1]}
    assert passes[exact[3]] <= 32 and passes[exact[5]] <= 32 and passes[exact[0]] <= 17
    assert passes[f'diffusion, 31 steps, temperature {t}, left-to-right order, one character a step'] == 32
    # distinct 4-grams: a share of every row's 4-grams; the greedy order repeats itself far more than the random one
    grams = {r[0]: float(r[6].rstrip('%')) for r in rows}
    assert all(0 < g <= 100 for g in grams.values())
    greedy = next(n for n in names if 'confidence noise 0.0' in n)
    assert grams[greedy] < grams[exact[3]]
    held_out = rows[-1]
    code, out, err = call_main(visualize, ['--benchmark', '--steps', 8, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0, err
    names = [line.strip('| ').split(' | ')[0] for line in out.splitlines()[2:]]
    assert [n for n in names if n.startswith('diffusion, 8 steps, temperature 1, random')] == [
        'diffusion, 8 steps, temperature 1, random order (the exact model)']  # only the steps asked
    assert all(n.startswith(('GPT', 'diffusion, 8 steps', 'diffusion, 31 steps', 'held-out')) for n in names)
    val_bpc = torch.load(workdir / 'out' / 'gpt.pt', weights_only=True)['summary']['val_bpc']
    assert abs(float(held_out[4].split(' ± ')[0]) - val_bpc) < 0.05  # random characters: log2(20) = 4.3 here, 0.3 above
    assert int(held_out[5].rstrip('%')) >= 60


def test_benchmark_of_one_character_is_finite(trained, monkeypatch, capsys):
    """--benchmark --length 1: no room for the diffusion model's start token, so its one character is generated and
    scored; every row has a finite figure."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    code, out, err = call_main(visualize, ['--benchmark', '--length', 1, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0, err
    rows = [line.strip('| ').split(' | ') for line in out.splitlines()[2:]]
    assert len(rows) >= 14 and all(math.isfinite(float(r[4].split(' ± ')[0])) for r in rows), out


def test_generative_bits_is_the_gpt_loss_in_bits():
    """visualize.generative_bits(judge, x) is gpt.loss_fn on x after the start token, per sample, in bits."""
    torch.manual_seed(0)
    judge = gpt.Transformer(tiny_config(gpt)).eval()
    with torch.no_grad():
        for p in judge.parameters():
            p.add_(0.5 * torch.randn_like(p))  # far from uniform, so that every position matters
    x = torch.randint(11, (4, 16))
    bits = visualize.generative_bits(judge, x)
    assert bits.shape == (4,)
    with torch.no_grad():
        batch = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        assert abs(bits.mean().item() - gpt.loss_fn(judge, batch).item() / math.log(2)) < 1e-5
        for i in range(4):
            assert abs(bits[i].item() - gpt.loss_fn(judge, batch[i:i + 1]).item() / math.log(2)) < 1e-5


# -----------------------------------------------------------------------------
# resume and atomic saves (real processes and real signals)

RESUME_ITERS = 120


def train_cmd(script, out, *extra):
    return [sys.executable, str(REPO / script), '--train', *TINY, '--max-iters', str(RESUME_ITERS), '--eval-interval', '1000',
            '--device', 'cpu', '--out', str(out), *INIT[script[:-3]], *map(str, extra)]


@pytest.fixture(scope='module', params=['gpt.py', 'diffusion.py'])
def resumed(request, workdir):
    """Run A trains RESUME_ITERS steps; run B gets Ctrl-C (gpt.py) or SIGTERM (diffusion.py, as a scheduler, docker
    stop or kill sends) after its first progress line, and then --resume."""
    script = request.param
    a, b = workdir / f'resume_a_{script}.pt', workdir / f'resume_b_{script}.pt'
    res = subprocess.run(train_cmd(script, a), cwd=workdir, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen(train_cmd(script, b), cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ''
    for line in proc.stdout:
        first += line
        if line.startswith('step 10/'):
            proc.send_signal(signal.SIGINT if script == 'gpt.py' else signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    stopped = torch.load(b, weights_only=True)['step']
    res = subprocess.run(train_cmd(script, b, '--resume'), cwd=workdir, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return dict(a=torch.load(a, weights_only=True), b=torch.load(b, weights_only=True), stopped=stopped, b_path=b,
                interrupted=first + out, resumed=res.stdout)


def test_ctrl_c_or_sigterm_saves_and_resume_continues(resumed):
    """Ctrl-C or SIGTERM saves mid-run, at the step it reached, and exits 0 with the resume command; --resume
    continues from that step to the end."""
    assert 10 <= resumed['stopped'] < RESUME_ITERS
    assert f"saved {resumed['b_path']} at step {resumed['stopped']}" in resumed['interrupted']
    assert 'interrupted' in resumed['interrupted'] and '--resume' in resumed['interrupted']
    assert f"from step {resumed['stopped']}" in resumed['resumed']
    assert resumed['b']['step'] == RESUME_ITERS


def test_resume_is_exact(resumed):
    """Interrupting and resuming gives the same weights as an uninterrupted run (optimizer and RNG restored)."""
    for weights in ('model', 'raw'):  # diffusion.py saves the running average and the trained weights
        if weights not in resumed['a']:
            continue
        a, b = resumed['a'][weights], resumed['b'][weights]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (weights, k)


def test_killed_training_never_corrupts_the_checkpoint(workdir, tmp_path):
    """SIGKILL at random moments of a run that saves every step: the checkpoint on disk always loads."""
    out = tmp_path / 'k.pt'
    rng = random.Random(0)
    for attempt in range(2):
        extra = ['--resume'] if attempt else []
        cmd = train_cmd('gpt.py', out, *extra)
        cmd[cmd.index('--max-iters') + 1], cmd[cmd.index('--eval-interval') + 1] = '100000', '1'
        proc = subprocess.Popen(cmd, cwd=workdir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline, loads, steps = time.time() + 300, 0, set()  # generous: a busy machine starves the child
            while time.time() < deadline and (loads < 20 or len(steps) < 3):  # read it while it is being rewritten
                time.sleep(0.01)
                if out.exists():
                    steps.add(torch.load(out, weights_only=True)['step'])
                    loads += 1
                assert proc.poll() is None, proc.stderr.read()
            assert len(steps) >= 3, 'the run never checkpointed'
            time.sleep(rng.uniform(0, 0.05))
        finally:
            proc.kill()
            proc.wait()
        ckpt = torch.load(out, weights_only=True)
        assert ckpt['step'] >= max(steps)


# -----------------------------------------------------------------------------
# more than one process: torchrun, two ranks on this CPU (gloo)

RANK_DRIVER = '''
import os, signal, sys
import torch
repo, name, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
module = __import__(name)
real, records, rank = module.loss_fn, [], int(os.environ['RANK'])

def recording(model, batch):  # each training batch, the random state of its noise or dropout, the weights it meets
    if torch.is_grad_enabled():
        records.append(dict(batch=batch, rng=torch.get_rng_state(), params=[p.detach().clone() for p in model.parameters()]))
        recording.model = model
        if rank == 1 and len(records) == stop_at:  # on rank 1 alone, during this step: Ctrl-C or SIGTERM
            signal.raise_signal(signal.SIGINT if name == 'gpt' else signal.SIGTERM)
    return real(model, batch)
module.loss_fn = recording
sys.argv = [name + '.py', *sys.argv[4:]]
module.main()
torch.save(dict(records=records, final=[p.detach() for p in recording.model.parameters()]), f'rank{rank}.pt')
'''
TWO_RANK_STOP, TWO_RANK_ITERS = 4, 6
TWO_RANK_ARGS = [*TINY, '--max-iters', TWO_RANK_ITERS, '--warmup-iters', 1, '--lr', 3e-3, '--eval-interval', 1000, '--device', 'cpu']


@pytest.fixture(scope='module', params=[gpt, diffusion], ids=['gpt', 'diffusion'])
def two_ranks(request, workdir, tmp_path_factory):
    """torchrun --nproc_per_node=2 <model>.py --train, recording every rank's batches and weights; rank 1 gets
    Ctrl-C during step TWO_RANK_STOP."""
    module, d = request.param, tmp_path_factory.mktemp('ranks')
    (d / 'driver.py').write_text(RANK_DRIVER)
    args = ['driver.py', REPO, module.KIND, TWO_RANK_STOP, '--train', *TWO_RANK_ARGS, *INIT[module], '--data-dir', workdir / 'data',
            '--out', 'two.pt']
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *map(str, args)],
                         cwd=d, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return dict(module=module, dir=d, stdout=res.stdout, ranks=[torch.load(d / f'rank{r}.pt', weights_only=True) for r in (0, 1)])


def test_two_ranks_step_together_like_one_process(two_ranks, workdir, tmp_path, monkeypatch):
    """The two ranks draw different batches and hold identical weights after every step, equal to those of one
    process stepping with --grad-accum 2 over the same two batches (and the same noise or dropout)."""
    module, (r0, r1) = two_ranks['module'], two_ranks['ranks']
    assert len(r0['records']) == len(r1['records']) == TWO_RANK_STOP
    micro = [record for pair in zip(r0['records'], r1['records']) for record in pair]  # rank 0's batch, then rank 1's
    real, seen, drawn = module.loss_fn, [], []

    def replaying(model, batch):
        if not torch.is_grad_enabled():
            return real(model, batch)
        drawn.append(batch)
        record = micro[len(seen)]
        seen.append([p.detach().clone() for p in model.parameters()])
        if len(seen) == 2 * TWO_RANK_STOP:
            signal.raise_signal(signal.SIGINT)  # stop where the two ranks stopped
        torch.set_rng_state(record['rng'])
        return real(model, record['batch'])
    monkeypatch.setattr(module, 'loss_fn', replaying)
    module.train(module.parse_args([*map(str, TWO_RANK_ARGS), *INIT[module], '--grad-accum', '2', '--data-dir', str(workdir / 'data'),
                                    '--out', str(tmp_path / 'one.pt')]))
    ckpt = torch.load(tmp_path / 'one.pt', weights_only=True)
    trained = list(ckpt.get('raw', ckpt['model']).values())  # diffusion.py's 'model' is the running average
    assert torch.equal(drawn[0], r0['records'][0]['batch'])  # rank 0 draws what a single process draws
    before_after = [(a['params'], b['params'], seen[2 * step]) for step, (a, b) in enumerate(zip(r0['records'], r1['records']))]
    for step, (p0, p1, p) in enumerate(before_after + [(r0['final'], r1['final'], trained)]):
        if step < TWO_RANK_STOP:  # each rank its own batch, and its own noise or dropout
            assert not torch.equal(r0['records'][step]['batch'], r1['records'][step]['batch']), step
            assert not torch.equal(r0['records'][step]['rng'], r1['records'][step]['rng']), step
        for a, b, c in zip(p0, p1, p):
            assert torch.equal(a, b), step  # the ranks never drift apart
            assert torch.allclose(a, c, rtol=0, atol=1e-6), (step, (a - c).abs().max())
    moved = max((a - b).abs().max().item() for a, b in zip(r0['final'], r0['records'][0]['params']))
    assert moved > 1e-3  # the weights did move: far more than the tolerance above


def test_ctrl_c_or_sigterm_on_one_rank_stops_both(two_ranks):
    """Ctrl-C (gpt.py) or SIGTERM (diffusion.py) on rank 1 alone: both ranks finish that step and stop (none waits for
    the other forever), rank 0 saves and prints, once, and torchrun exits 0."""
    r0, r1 = two_ranks['ranks']
    assert len(r0['records']) == len(r1['records']) == TWO_RANK_STOP
    lines = two_ranks['stdout'].splitlines()
    saved = [line for line in lines if 'saved' in line]
    assert len(saved) == 1 and saved[0].startswith(f'interrupted; saved two.pt at step {TWO_RANK_STOP}; continue with: python')
    assert sum('M parameters' in line for line in lines) == sum(f'step {TWO_RANK_STOP}: train' in line for line in lines) == 1


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, workdir, monkeypatch, capsys):
    """Two ranks write one checkpoint, rank 0's (its batch generator, the global token count), and a single
    process resumes it to --max-iters."""
    module, d = two_ranks['module'], two_ranks['dir']
    assert sorted(os.listdir(d)) == ['driver.py', 'rank0.pt', 'rank1.pt', 'two.pt']  # no temp file left either
    ckpt = torch.load(d / 'two.pt', weights_only=True)
    assert ckpt['step'] == TWO_RANK_STOP and ckpt['summary']['tokens'] == TWO_RANK_STOP * 2 * 8 * 32
    assert ckpt['summary']['hardware'].startswith('2 x ')
    generator = torch.Generator().manual_seed(module.defaults['seed'])  # a single process's batches, as rank 0 draws them
    _, split = module.load_data(str(workdir / 'data'))
    for _ in range(TWO_RANK_STOP):
        module.get_batch(split['train'], 8, 32, generator)
    assert torch.equal(ckpt['rng']['batches'], generator.get_state())
    monkeypatch.chdir(d)
    argv = ['--train', '--resume', *TWO_RANK_ARGS, '--data-dir', workdir / 'data', '--out', 'two.pt']
    code, out, err = call_main(module, argv, monkeypatch, capsys)
    assert code == 0 and f'resuming two.pt from step {TWO_RANK_STOP}' in out, err
    ckpt = torch.load(d / 'two.pt', weights_only=True)
    assert ckpt['step'] == TWO_RANK_ITERS
    assert ckpt['summary']['tokens'] == TWO_RANK_STOP * 2 * 8 * 32 + (TWO_RANK_ITERS - TWO_RANK_STOP) * 8 * 32


# -----------------------------------------------------------------------------
# svg animation

import xml.etree.ElementTree as ET  # noqa: E402

SVG = '{http://www.w3.org/2000/svg}'
HREF = '{http://www.w3.org/1999/xlink}href'


def svg_columns(path):
    """The columns of a visualize.py --svg file, read back as a browser would: {name: cells}, a cell
    being (x, y, timeline) in the order of the text, a timeline [(moment, a fraction of the loop,
    glyph shown from then on)], a glyph the text of the <defs> element the cell shows, in brackets
    when it is drawn reversed (just changed)."""
    root = ET.parse(path).getroot()
    assert root.tag == SVG + 'svg'
    glyphs = {el.get('id'): ''.join(el.itertext()) for el in root.find(SVG + 'defs')}
    glyphs.update({el.get('id'): f'[{glyphs[el.get("id")]}]' for el in root.find(SVG + 'defs') if el.find(SVG + 'rect') is not None})
    columns = {}
    for column in root.iter(SVG + 'g'):
        text = column.find(SVG + "g[@class='text']")
        if text is None:
            continue
        cells = []
        for use in text.findall(SVG + 'use'):
            animate = use.find(SVG + 'animate')
            if animate is None:  # never changes
                timeline = [(0.0, glyphs[use.get(HREF)[1:]])]
            else:
                assert animate.get('attributeName') == 'xlink:href' and animate.get('calcMode') == 'discrete'
                assert animate.get('repeatCount') == 'indefinite' and re.fullmatch(r'\d+ms', animate.get('dur'))
                times = [float(t) for t in animate.get('keyTimes').split(';')]
                values = animate.get('values').split(';')
                assert len(times) == len(values) > 1 and times[0] == 0 and times[-1] < 1
                assert all(a < b for a, b in zip(times, times[1:])), times
                timeline = [(t, glyphs[v[1:]]) for t, v in zip(times, values)]
                assert use.get(HREF) == values[-1]  # a viewer that does not animate shows the end
            cells.append((float(use.get('x')), float(use.get('y')), timeline))
        columns[column.get('id')] = cells
    return columns


def shown(timeline, moment):
    return [glyph for t, glyph in timeline if t <= moment][-1]


def final_text(cells):
    """The text the cells show at the end of the loop (none reversed), their line breaks drawn as arrows."""
    glyphs = [shown(timeline, 1.0) for _, _, timeline in cells]
    assert all(len(glyph) == 1 and glyph != visualize.MASK for glyph in glyphs), glyphs
    return ''.join(glyphs).replace(visualize.NEWLINE, '\n')


def call_svg(argv, path, monkeypatch, capsys):
    code, out, err = call_main(visualize, [*argv, '--device', 'cpu', '--svg', path], monkeypatch, capsys)
    assert code == 0, err
    assert re.fullmatch(rf'wrote {re.escape(str(path))} \(\d+ KB, [\w +]+ frames\)\n', out), out
    return svg_columns(path)


def test_svg_is_an_animation(trained, tmp_path, monkeypatch, capsys):
    """--svg --compare writes one SVG file (and no temp file beside it) whose cells loop from the start
    to the finished texts: the GPT's from nothing, left to right, one character per pass; the diffusion
    model's from masks (after its start token, not shown), everywhere at once in fewer passes, on the same clock."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    columns = call_svg(['--compare', '--steps', 4], tmp_path / 'a.svg', monkeypatch, capsys)
    assert os.listdir(tmp_path) == ['a.svg']
    gpt_cells, diffusion_cells = columns['GPT'], columns['diffusion']
    assert len(gpt_cells) == 32 and len(diffusion_cells) == 31  # one context after the start token
    assert [shown(timeline, 0) for _, _, timeline in gpt_cells] == [''] * 32
    assert [shown(timeline, 0) for _, _, timeline in diffusion_cells] == [visualize.MASK] * 31
    # the moment each cell first shows a character (a mask is none)
    first = {name: [min(t for t, glyph in timeline if glyph not in ('', visualize.MASK)) for _, _, timeline in cells]
             for name, cells in columns.items()}
    assert first['GPT'] == sorted(set(first['GPT']))  # one new character per pass, left to right
    last = {name: max(timeline[-1][0] for _, _, timeline in cells) for name, cells in columns.items()}
    assert last['diffusion'] < first['GPT'][10] < last['GPT']  # 5 passes against 32


@pytest.mark.parametrize('argv', [['--compare', '--seed', 7], ['--compare', '--prompt', 'the dog', '--temperature', 0.8],
                                  ['--infill', 'the cat ___ on a ___.\n___ ran', '--seed', 3]], ids=['compare', 'prompt', 'infill'])
def test_svg_ends_in_the_scripts_own_text(argv, trained, tmp_path, monkeypatch, capsys):
    """At the end of its loop the SVG shows exactly the text that diffusion.py (and gpt.py, with --compare)
    prints for the same flags, read back from the cells; the cells read in order, row by row, and a
    line break ends its row."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    columns = call_svg([*argv, '--steps', 4], tmp_path / 'a.svg', monkeypatch, capsys)
    flags = [a for a in argv if a != '--compare'] + ['--device', 'cpu']
    printed = {'diffusion': call_main(diffusion, [*flags, '--steps', 4], monkeypatch, capsys)[1][:-1]}
    if '--compare' in argv:
        printed['GPT'] = call_main(gpt, flags, monkeypatch, capsys)[1][:-1]
    assert {name: final_text(cells) for name, cells in columns.items()} == printed
    for name, cells in columns.items():
        assert cells == sorted(cells, key=lambda cell: (cell[1], cell[0])), name
        for (_, y, _), c, (_, y_next, _) in zip(cells, printed[name], cells[1:]):
            assert (y_next > y) == (c == '\n'), name  # no line wider than the limit here


def test_svg_is_reproducible(trained, tmp_path, monkeypatch, capsys):
    """The same flags give the same bytes (a committed picture can be made again); another seed, another
    file. A write cut short leaves the file that was there, and no temp file."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    files = {}
    for name, seed in (('a', 1), ('b', 1), ('c', 2)):
        call_svg(['--compare', '--steps', 4, '--seed', seed], tmp_path / f'{name}.svg', monkeypatch, capsys)
        files[name] = (tmp_path / f'{name}.svg').read_bytes()
    assert files['a'] == files['b'] != files['c']

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(visualize.os, 'replace', interrupted)
    code, _, err = call_main(visualize, ['--compare', '--steps', 4, '--seed', 3, '--svg', tmp_path / 'a.svg'], monkeypatch, capsys)
    assert code == 0 and 'Traceback' not in err, err
    assert sorted(os.listdir(tmp_path)) == ['a.svg', 'b.svg', 'c.svg'] and (tmp_path / 'a.svg').read_bytes() == files['a']


def test_svg_of_a_uniform_graph_model(trained, tmp_path, monkeypatch, capsys):
    """A uniform-graph model, whose positions start as random characters and change again and again:
    every cell still ends on the character diffusion.py prints."""
    workdir, _ = trained
    ckpt = tmp_path / 'uniform.pt'
    diffusion.train(make_args(diffusion, workdir / 'data', ckpt, '--graph', 'uniform', '--max-iters', 5, '--eval-interval', 5))
    monkeypatch.chdir(workdir)
    columns = call_svg(['--diffusion-ckpt', ckpt, '--steps', 8, '--seed', 5], tmp_path / 'u.svg', monkeypatch, capsys)
    code, out, err = call_main(diffusion, ['--ckpt', ckpt, '--steps', 8, '--seed', 5, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0, err
    assert final_text(columns['diffusion']) == out[:-1]
    # some position shows two characters or more on its way (never so on the absorbing graph)
    characters = [{glyph.strip('[]') for _, glyph in timeline} - {visualize.MASK} for _, _, timeline in columns['diffusion']]
    assert max(map(len, characters)) >= 2


@pytest.mark.parametrize('argv,needles', [
    (['--svg', 'a.svg', '--benchmark'], ['--svg', '--benchmark']),
    (['--svg', 'missing/a.svg'], ['--svg missing/a.svg', 'no folder missing']),
    (['--svg', '.'], ['--svg . is a folder']),
    (['--frame-ms', 40], ['--frame-ms', '--svg FILE']),
    (['--svg', 'a.svg', '--frame-ms', 0], ['--frame-ms must be at least 1']),
], ids=['with-benchmark', 'no-folder', 'a-folder', 'frame-ms-alone', 'frame-ms-0'])
def test_svg_bad_arguments_give_one_line(argv, needles, tmp_path, monkeypatch, capsys):
    """Each is refused in one line before any checkpoint is read (the one named here does not exist)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(visualize, [*argv, '--diffusion-ckpt', 'none.pt', '--gpt-ckpt', 'none.pt'], monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# documentation

def prose_lines(path, inline_code=False):
    """The lines of a markdown file outside fenced code, by default with inline code removed."""
    lines, fenced = [], False
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
        elif not fenced:
            lines.append(line if inline_code else re.sub(r'`[^`]*`', '', line))
    return lines


def github_anchors(path):
    """The #anchors GitHub makes of a markdown file's headings (lower case, spaces to '-', punctuation dropped)."""
    anchors, seen = set(), {}
    for line in prose_lines(path, inline_code=True):
        heading = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if heading:
            slug = ''.join('-' if c == ' ' else c for c in re.sub(r'<[^>]+>', '', heading[1]).strip().lower()
                           if c in ' -_' or c.isalnum())
            anchors.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_documentation_links_resolve_and_the_readme_is_short():
    """Every relative link and #anchor in README.md and docs/*.md points at a file and heading that exist; the README
    is at most 300 lines and shows the animation within its first 40."""
    files = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
    links = 0
    for path in files:
        for url in re.findall(r'!?\[[^\]]*\]\(([^)\s]+)\)', '\n'.join(prose_lines(path))):
            if re.match(r'^[a-z]+:', url):
                continue
            target, _, anchor = url.partition('#')
            resolved = (path.parent / target).resolve() if target else path
            assert resolved.exists(), (path.name, url)
            assert not anchor or anchor in github_anchors(resolved), (path.name, url)
            links += 1
    assert links > 20  # the checks above did run
    readme = (REPO / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(readme) <= 300
    assert any('docs/compare.svg' in line and line.startswith('![') for line in readme[:40])


# -----------------------------------------------------------------------------
# 8. where learners are: --device cpu, cuda, cuda:N and mps, the precision on each, and platforms
# without /proc/meminfo, os.sysconf or SIGTERM (Windows). GPUs and other platforms are stood in for
# by monkeypatching what torch and os report.

TINY_CPU = [*TINY, '--device', 'cpu']
SIGTERM = signal.SIGTERM  # kept: some tests take signal.SIGTERM away


@pytest.fixture(autouse=True)
def keep_sigterm():
    # StopRequest installs its own handler; give pytest its own back afterwards
    handler = signal.getsignal(SIGTERM)
    yield
    signal.signal(SIGTERM, handler)


def one_error_line(code, err, *needles):
    """A failure the user can act on: exit 2, a single 'error: ...' line, no traceback."""
    assert code == 2, err
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def check_device(device, capsys):
    """(exit code, stderr) of diffusion.py's own argument check of --device."""
    p = plumbing.parser(diffusion.__doc__, diffusion.defaults, diffusion.SHIPPED)
    capsys.readouterr()
    try:
        plumbing.check_args(p.parse_args(['--device', device]))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def no_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)


# -----------------------------------------------------------------------------
# devices


def test_best_device_is_the_fastest_here(monkeypatch):
    """The default --device: cpu on this machine, mps on a Mac, cuda wherever CUDA is."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip('a GPU is available here')
    assert plumbing.best_device() == 'cpu'
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert plumbing.best_device() == 'mps'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert plumbing.best_device() == 'cuda'


@pytest.mark.parametrize('device', ['mps', 'cuda', 'cuda:7'])
def test_missing_device_names_what_is_here(device, monkeypatch, capsys):
    """A device this machine lacks: one line naming it, what is available, and what to use."""
    no_gpus(monkeypatch)
    line = one_error_line(*check_device(device, capsys), f'--device {device}:',
                          'not available here (available: cpu)', 'use --device cpu')
    assert ("Apple's mps" if device == 'mps' else 'CUDA') in line


def test_cuda_gpu_number_is_checked(monkeypatch, capsys):
    """On a machine with two GPUs (as torch reports it), cuda:0, cuda:1 and cuda pass, cuda:7 is
    one line listing the two; mps passes on a Mac."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    for device in ('cpu', 'cuda', 'cuda:0', 'cuda:1'):
        assert check_device(device, capsys) == (0, '')
    one_error_line(*check_device('cuda:7', capsys), 'CUDA GPU 7',
                   '(available: cpu, cuda:0, cuda:1)', 'use --device cuda')
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert check_device('mps', capsys) == (0, '')


@pytest.mark.parametrize('device', ['tpu', 'cuda:x', 'CPU', 'cuda:'])
def test_unknown_device_lists_the_accepted_forms(device, capsys):
    one_error_line(*check_device(device, capsys), repr(device), 'cpu, cuda, cuda:N', 'mps')


def test_missing_device_from_the_command_line(tmp_path):
    """python diffusion.py --device mps, as a user runs it: one line, a non-zero exit, no traceback
    (checked before any weights are read: the folder has none)."""
    if torch.backends.mps.is_available():
        pytest.skip('mps is available here')
    res = subprocess.run([sys.executable, str(REPO / 'diffusion.py'), '--device', 'mps'],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and res.stdout == ''
    one_error_line(res.returncode, res.stderr, '--device mps', "Apple's mps", 'available: cpu')


def test_mps_fallback_is_set_before_torch_loads(tmp_path):
    """torch reads PYTORCH_ENABLE_MPS_FALLBACK once, as it loads: importing plumbing sets it to 1
    before torch is first imported, and leaves a value the user gave alone."""
    probe = ("import builtins, os\n"
             "real, seen = builtins.__import__, []\n"
             "def spy(name, *args, **kwargs):\n"
             "    if name.split('.')[0] == 'torch' and not seen:\n"
             "        seen.append(os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'))\n"
             "    return real(name, *args, **kwargs)\n"
             "builtins.__import__ = spy\n"
             "import plumbing\n"
             "print(seen)\n")
    for given, expected in ((None, "['1']"), ('0', "['0']")):
        env = {k: v for k, v in ENV.items() if k != 'PYTORCH_ENABLE_MPS_FALLBACK'}
        env |= {'PYTORCH_ENABLE_MPS_FALLBACK': given} if given else {}
        res = subprocess.run([sys.executable, '-c', probe], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.strip() == expected, res.stderr


# -----------------------------------------------------------------------------
# precision


def test_precision_is_native_or_float32(monkeypatch):
    """bfloat16 only where the hardware computes in it: a CPU with native bfloat16 (as oneDNN
    reports it), a CUDA GPU from Ampere on (compute capability 8); float32 on older GPUs, on mps,
    and on a CPU that would only emulate it."""
    monkeypatch.setattr(torch.version, 'hip', None)
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
        assert plumbing.precision('cpu') == (torch.bfloat16 if native else torch.float32)
        assert plumbing.precision('mps') == torch.float32
    for major, dtype in ((7, torch.float32), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, 'get_device_properties',
                            lambda device: SimpleNamespace(major=major))
        assert plumbing.precision('cuda') == plumbing.precision('cuda:1') == dtype


def test_autocast_computes_in_the_chosen_precision(monkeypatch):
    """On a CPU a matrix product inside autocast is in bfloat16 only where it is native."""
    a = torch.randn(8, 8)
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
        with plumbing.autocast('cpu'):
            assert (a @ a).dtype == (torch.bfloat16 if native else torch.float32)
    with plumbing.autocast('mps'):  # float32: nothing to turn on, so no mps needed here
        assert (a @ a).dtype == torch.float32


def test_training_log_names_the_device(monkeypatch, capsys):
    """The first line of the training log: the device, what it is, and the precision."""
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    args = SimpleNamespace(device='cpu', max_iters=10)
    capsys.readouterr()
    plumbing.Progress(args, dict(tokens=0, seconds=0.0), 256, lambda step, args: 1e-3)
    threads = torch.get_num_threads()
    assert capsys.readouterr().out == (
        f'training on cpu ({platform.machine()} CPU, {threads} threads, float32)\n')
    assert plumbing.hardware('mps') == 'Apple mps GPU'
    assert plumbing.hardware('mps', 2) == '2 x Apple mps GPU'


# -----------------------------------------------------------------------------
# platforms without /proc/meminfo, os.sysconf or SIGTERM (Windows)


# the shipped weights, named: out/ may hold a run in progress
SAMPLE = {'gpt': ['--ckpt', gpt.SHIPPED],
          'diffusion': ['--ckpt', diffusion.SHIPPED, '--steps', 4]}


@pytest.mark.parametrize('module', [gpt, diffusion], ids=['gpt', 'diffusion'])
def test_memory_check_is_skipped_where_free_memory_is_unknown(module, monkeypatch, capsys):
    """Without /proc/meminfo and os.sysconf (Windows), check_memory lets everything through instead
    of crashing, and sampling from the shipped weights runs and prints its 20 characters."""
    with pytest.raises(SystemExit):  # here, where the memory free is known, it refuses
        plumbing.check_memory(10 ** 18, 'a test', 'ask for less')
    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == '/proc/meminfo':
            raise FileNotFoundError(errno.ENOENT, 'No such file or directory', path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', no_meminfo)
    monkeypatch.delattr(os, 'sysconf')
    assert plumbing.free_memory() is None
    plumbing.check_memory(10 ** 18, 'a test', 'ask for less')  # neither dies nor raises

    monkeypatch.chdir(REPO)
    argv = [*SAMPLE[module.KIND], '--length', 20, '--device', 'cpu']
    code, out, err = call_main(module, argv, monkeypatch, capsys)
    assert code == 0, err
    assert len(out) == 21 and out.endswith('\n'), out  # the text, then print's newline
    assert 'error' not in err and '1 x 20 characters' in err, err


def test_stop_request_without_sigterm(monkeypatch):
    """Where signal.SIGTERM does not exist, StopRequest still catches Ctrl-C, and the step after it
    agrees to stop; SIGTERM's handler is left as it was."""
    before = signal.getsignal(SIGTERM)
    monkeypatch.delattr(signal, 'SIGTERM')
    stop = plumbing.StopRequest()
    assert signal.getsignal(signal.SIGINT) == stop.ask
    assert signal.getsignal(SIGTERM) == before
    assert stop.agree(torch.tensor(2.0), 1, 'cpu') == (2.0, False)
    signal.raise_signal(signal.SIGINT)
    assert stop.asked
    assert stop.agree(torch.tensor(2.0), 2, 'cpu') == (2.0, True)


# -----------------------------------------------------------------------------
# --out, checked for real before the first step


@pytest.fixture
def data(tmp_path, monkeypatch, capsys):
    """tmp_path holding a small text prepared into data/ by prepare.py, as the working folder."""
    rng, words, text = random.Random(0), 'the cat sat on a mat and dog ran'.split(), ''
    while len(text) < 4000:
        text += ' '.join(rng.choice(words) for _ in range(rng.randint(3, 9))) + '.\n'
    (tmp_path / 'corpus.txt').write_text(text)
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(prepare, ['--input', 'corpus.txt'], monkeypatch, capsys)
    assert code == 0, err
    return tmp_path


@pytest.mark.parametrize('module', [gpt, diffusion], ids=['gpt', 'diffusion'])
@pytest.mark.parametrize('case', ['under-proc', 'makedirs-fails', 'disk-full'])
def test_out_that_cannot_be_written_is_refused_before_training(
        module, case, data, monkeypatch, capsys):
    """An --out whose folder cannot be made (under /proc, where os.access tells root yes; or
    makedirs failing), or in which no file can be written (a full disk): one line naming --out
    before the first step, and nothing left behind, not even the folders made to find out."""
    out, reason = {'under-proc': ('/proc/nope/model.pt', 'No such file'),
                   'makedirs-fails': ('new/model.pt', 'Permission denied'),
                   'disk-full': ('new/deeper/model.pt', 'No space left')}[case]
    if case == 'makedirs-fails':
        def fail(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, 'Permission denied', path)
        monkeypatch.setattr(os, 'makedirs', fail)
    if case == 'disk-full':
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(plumbing.tempfile, 'NamedTemporaryFile', full)
    argv = ['--train', *TINY_CPU, '--max-iters', '3', '--eval-interval', '2', '--out', out]
    code, stdout, err = call_main(module, argv, monkeypatch, capsys)
    one_error_line(code, err, f'--out {out} cannot be written', reason)
    assert 'step ' not in stdout and 'training on' not in stdout, stdout
    assert sorted(os.listdir(data)) == ['corpus.txt', 'data']
    assert not os.path.exists('/proc/nope')


def test_out_that_can_be_written_is_left_to_the_first_save(tmp_path):
    """A writable --out in folders that do not exist yet passes, and the check leaves nothing: the
    folders are made at the first save."""
    plumbing.check_output(str(tmp_path / 'a' / 'b' / 'model.pt'))
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# 9. the page: python visualize.py --serve, visualize.html, and headless Chromium on it. The tiny models of `trained`
# serve most tests; the shipped uniform-graph model, whose 4,097 steps take a minute, shows that a second request
# waits its turn or is told the server is busy, and that a closed tab stops its generation

import base64  # noqa: E402
import http.client  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import urllib.request  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402


def start_server(argv, cwd):
    """visualize.py --serve on a free port (--port 0) in a subprocess: (process, its address, the lines it printed)."""
    proc = subprocess.Popen([sys.executable, str(REPO / 'visualize.py'), '--serve', '--port', '0', '--device', 'cpu', *map(str, argv)],
                            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.fullmatch(r'serving the page at (http://[\d.]+:\d+/) \(Ctrl-C stops\)\n', line)
    if not m:
        proc.kill()
        raise AssertionError(line + proc.communicate()[1])
    return proc, m[1], [line]


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope='module')
def page_server(trained):
    """The tiny models, picked as the scripts pick them: out/ of the folder the server starts in, before weights/."""
    workdir, _ = trained
    proc, url, _ = start_server([], workdir)
    yield SimpleNamespace(proc=proc, url=url, workdir=workdir)
    stop_server(proc)


@pytest.fixture(scope='module')
def uniform_server():
    """The shipped uniform-graph model beside the shipped GPT, at another loopback address than 127.0.0.1."""
    proc, url, lines = start_server(['--host', '127.0.0.2', '--gpt-ckpt', REPO / gpt.SHIPPED,
                                     '--diffusion-ckpt', REPO / 'weights' / 'uniform.pt'], REPO)
    lines.append(proc.stdout.readline())
    yield SimpleNamespace(proc=proc, url=url, lines=lines)
    stop_server(proc)


def connect(url, settings=None, body=None):
    """POST the settings (or a raw body) to /generate: the open response."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request('POST', '/generate', body=json.dumps(settings).encode() if body is None else body,
                 headers={'Content-Type': 'application/json'})
    return conn.getresponse()


def events(response):
    """The Server-Sent Events of a response, one JSON object each, as they arrive."""
    for line in response:
        if line.startswith(b'data: '):
            yield json.loads(line[len('data: '):])
        else:
            assert line == b'\n', line


def generate(url, **settings):
    """(status, the events or the one-line message, seconds from the request to the first frame)."""
    t0 = time.perf_counter()
    response = connect(url, settings)
    if response.status != 200:
        return response.status, response.read().decode(), None
    assert response.getheader('Content-Type') == 'text/event-stream'
    got, first = [], None
    for event in events(response):
        got.append(event)
        if first is None and 'frame' in event:
            first = time.perf_counter() - t0
    return 200, got, first


def runs_of(stream):
    """{model: dict(vocab, start, frames, done)} of a whole stream, which must end with the end event."""
    assert stream[-1] == {'end': True}, stream[-3:]
    runs = {}
    for event in stream[:-1]:
        if 'vocab' in event:
            runs[event['model']] = dict(vocab=event['vocab'], start=event['start'], frames=[], done=None)
        elif 'frame' in event:
            runs[event['model']]['frames'].append(event['frame'])
        else:
            runs[event['model']]['done'] = event
    return runs


def test_page_is_one_file_with_no_external_request(page_server):
    """GET / is visualize.html itself (200, text/html), with no URL of another host in it: no http(s)://, no src, href or
    url() but local ones, fetch() to paths of its own server. /options has the defaults of `python diffusion.py` and the
    checkpoints of out/, and any other path is a 404 with one line."""
    with urllib.request.urlopen(page_server.url, timeout=30) as response:
        assert response.status == 200 and response.headers['Content-Type'] == 'text/html; charset=utf-8'
        page = response.read()
    assert page == (REPO / 'visualize.html').read_bytes()
    html = page.decode()
    assert not re.search(r'https?:|//[a-z]', html.replace('// ', '').replace('//\n', ''), re.I), 'a URL in the page'
    assert not re.search(r'\b(src|href)\s*=|url\(|@import|<link|<iframe|<img', html, re.I)
    assert re.findall(r"fetch\('([^']*)'", html) == ['generate', 'options']
    with urllib.request.urlopen(page_server.url + 'options', timeout=30) as response:
        options = json.load(response)
    defaults = diffusion.parse_args(['--device', 'cpu'])
    assert (options['steps'], options['seed']) == (defaults.steps, defaults.seed)
    assert options['temperatures'] == {'GPT': gpt.defaults['temperature'], 'diffusion': defaults.temperature}
    assert options['context'] == 32 and options['length'] == 31 and options['graph'] == 'absorb'
    assert options['checkpoints'] == {'GPT': 'out/gpt.pt', 'diffusion': 'out/diffusion.pt', 'device': 'cpu'}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(page_server.url + 'nothing', timeout=30)
    assert e.value.code == 404 and e.value.read().decode().count('\n') == 1


def test_page_offers_the_orders_and_each_scripts_temperature(page_server, monkeypatch, capsys):
    """For an absorbing model the page offers the decoding order (its choices and default, diffusion.py's) and the
    confidence noise, and passes them on: the page's text is the one diffusion.py prints with the same flags. Without
    a temperature, each model samples at its own script's: the GPT's text is the one gpt.py prints. A uniform-graph
    model is offered no order, and a bad order is a 400."""
    model = diffusion.Transformer(tiny_config(diffusion)).eval()
    args = SimpleNamespace(device='cpu', gpt_ckpt='g.pt', diffusion_ckpt='d.pt')
    options = visualize.page_options(args, {'diffusion': (model, 'abcdefghij')})
    assert options['extra'] == {'order': {'default': diffusion.defaults['order'], 'choices': plumbing.ORDERS},
                                'confidence_noise': {'default': diffusion.defaults['confidence_noise'], 'choices': None}}
    assert options['temperatures'] == {'GPT': gpt.defaults['temperature'], 'diffusion': diffusion.defaults['temperature']}
    uniform = diffusion.Transformer(tiny_config(diffusion, graph='uniform')).eval()
    assert visualize.page_options(args, {'diffusion': (uniform, 'abcdefghij')})['extra'] == {}
    with pytest.raises(visualize.BadRequest, match="unknown --order 'sideways'"):
        visualize.request({'order': 'sideways'}, args, {'diffusion': (model, 'abcdefghij')}, options)
    monkeypatch.chdir(page_server.workdir)
    for settings in ({'order': 'left-to-right'}, {'order': 'confidence', 'confidence_noise': 0}, {}):
        status, stream, _ = generate(page_server.url, text='', steps=6, seed=5, length=20, **settings)
        runs = runs_of(stream)
        flags = [f'--{k.replace("_", "-")}={v}' for k, v in settings.items()]
        code, out, err = call_main(diffusion, ['--steps', 6, '--seed', 5, '--length', 20, '--device', 'cpu', *flags],
                                   monkeypatch, capsys)
        assert status == 200 and code == 0 and out == runs['diffusion']['done']['text'] + '\n', (settings, err)
    code, out, err = call_main(gpt, ['--seed', 5, '--length', 20, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0 and out == runs['GPT']['done']['text'] + '\n', err


def test_page_streams_each_frame_as_it_is_made(page_server, monkeypatch, capsys):
    """A sample from nothing: the diffusion model's start (all masked), then steps + 1 frames, the first within a second
    of the request; then the GPT's, a character per frame; each with passes, GFLOPs and seconds. Both texts have the
    length asked for, and the diffusion model's is the very text `python diffusion.py` prints with the same settings."""
    status, stream, first = generate(page_server.url, text='', steps=8, temperature=1, seed=3, length=20)
    assert status == 200 and first < 1, (status, first)
    runs = runs_of(stream)
    assert list(runs) == ['diffusion', 'GPT']  # in this order: the diffusion model first
    vocab = runs['diffusion']['vocab']
    assert runs['diffusion']['start'] == [len(vocab)] * 20
    assert len(runs['diffusion']['frames']) == 9 and len(runs['GPT']['frames']) == 20
    assert [len(frame) for frame in runs['GPT']['frames']] == list(range(1, 21))  # left to right
    for run in runs.values():
        text = ''.join(run['vocab'][t] for t in run['frames'][-1])
        assert run['done']['text'] == text and len(text) == 20
        assert run['done']['passes'] >= 1 and run['done']['gflops'] > 0 and run['done']['seconds'] > 0
    masked = [frame.count(len(vocab)) for frame in runs['diffusion']['frames']]
    assert masked[-1] == 0 and masked == sorted(masked, reverse=True) and masked[0] > 0  # masks go, never come back
    monkeypatch.chdir(page_server.workdir)
    code, out, err = call_main(diffusion, ['--steps', 8, '--seed', 3, '--length', 20, '--device', 'cpu'], monkeypatch, capsys)
    assert code == 0 and out == runs['diffusion']['done']['text'] + '\n', err


def test_page_keeps_a_prompt_and_a_template(page_server):
    """A text without holes is a prompt that both models continue to the length; a text with holes is a template that
    the diffusion model alone fills in (no GPT: it cannot see past a hole), keeping every other character, its length
    the template's whatever the length field says."""
    status, stream, _ = generate(page_server.url, text='the cat', steps=6, temperature=1, seed=1, length=24)
    runs = runs_of(stream)
    assert status == 200 and list(runs) == ['diffusion', 'GPT']
    for run in runs.values():
        assert run['done']['text'].startswith('the cat') and len(run['done']['text']) == 24
    template = 'the ___ sat on a ___.'
    status, stream, _ = generate(page_server.url, text=template, steps=6, temperature=1, seed=1, length=5)
    runs = runs_of(stream)
    assert status == 200 and list(runs) == ['diffusion'] and len(runs['diffusion']['frames']) == 7
    vocab, text = runs['diffusion']['vocab'], runs['diffusion']['done']['text']
    assert runs['diffusion']['start'] == [len(vocab) if c == '_' else vocab.index(c) for c in template]
    assert len(text) == len(template) and all(c == t for c, t in zip(text, template) if t != '_') and '_' not in text


BAD_REQUESTS = {  # settings (or a raw body): the one line of the 400; the tiny models have a context of 32
    'length-beyond-the-context': (dict(length=33), '--length 33 is longer than the context of the models (32 characters)'),
    'steps-0': (dict(steps=0), '--steps must be at least 1'),
    'steps-too-many': (dict(steps=5000), '--steps 5000: give at most 4096 here'),
    'steps-not-a-number': (dict(steps='many'), "argument --steps: invalid int value: 'many'"),
    'steps-empty': (dict(steps=''), "argument --steps: invalid int value: ''"),
    'temperature-not-a-number': (dict(temperature='warm'), "argument --temperature: invalid float value: 'warm'"),
    'temperature-0': (dict(temperature=0), '--temperature 0.0: give a number in [0.001, 1000]'),
    'seed-negative': (dict(seed=-1), '--seed -1 must be from 0 to 2**63 - 1'),
    'unknown-characters': (dict(text='the cat Zé'), "--prompt has characters the model does not know: 'Z' 'é'"),
    'unknown-in-template': (dict(text='the _ sat!'), "--infill has characters the model does not know: '!'"),
    'prompt-longer-than-length': (dict(text='the cat sat', length=5), '--prompt has 11 characters, more than --length 5'),
    'template-beyond-the-context': (dict(text='_' * 40), '--infill has 40 characters, more than the context of 32'),
    'unknown-setting': (dict(device='cuda'), "unknown setting 'device'"),
    'text-not-a-string': (dict(text=7), 'send a JSON object of the settings, its text a string'),
    'not-an-object': (b'[1, 2]', 'send a JSON object of the settings, its text a string'),
    'not-json': (b'{"steps": ', 'the body is not JSON'),
    'oversized-body': (json.dumps(dict(text='the cat ' * 2100)).encode(), f'more than {visualize.MAX_BODY}; send less text'),
}


@pytest.mark.parametrize('case', BAD_REQUESTS)
def test_page_bad_input_is_a_400_with_one_line(case, page_server):
    """Every bad input is a 400 whose body is one line that names what is wrong (the page shows it), and the server
    goes on serving."""
    settings, needle = BAD_REQUESTS[case]
    response = connect(page_server.url, body=settings if isinstance(settings, bytes) else None,
                       settings=None if isinstance(settings, bytes) else dict(dict(text='', steps=4, length=8), **settings))
    message = response.read().decode()
    assert response.status == 400 and response.getheader('Content-Type').startswith('text/plain'), message
    assert needle in message and message.endswith('\n') and message.count('\n') == 1 and 'Traceback' not in message
    assert generate(page_server.url, text='', steps=2, length=4)[0] == 200


def test_page_request_without_a_length_header_is_a_400(page_server):
    parts = urlsplit(page_server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(b'POST /generate HTTP/1.0\r\n\r\n')
        reply = s.makefile('rb').read().decode()
    assert reply.startswith('HTTP/1.0 400') and reply.endswith('\r\n\r\nsend the settings as a JSON body, with its Content-Length\n')


def test_serve_bad_arguments_give_one_line(trained, monkeypatch, capsys):
    """--serve with a setting of the page, --port or --host without --serve, a port out of range, or a port in use:
    one line each."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    for argv, needle in [(['--serve', '--steps', 8], 'leave out --steps'), (['--serve', '--compare'], 'leave out --compare'),
                         (['--port', 8001], 'give --serve too'), (['--serve', '--port', 70000], '--port 70000: give 1 to 65535')]:
        assert_one_error_line(*call_main(visualize, [*argv, '--device', 'cpu'], monkeypatch, capsys)[::2], needle)
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = call_main(visualize, ['--serve', '--port', port, '--device', 'cpu'], monkeypatch, capsys)
    assert_one_error_line(code, err, f'cannot serve at --host 127.0.0.1 --port {port} (Address already in use)')


def test_page_serves_a_uniform_graph_model_and_warns_of_another_host(uniform_server):
    """The uniform graph's frames hold no mask, only characters that flip; any --host but 127.0.0.1 is warned of."""
    assert uniform_server.lines[1].startswith('warning: --host 127.0.0.2 opens the page to that network')
    status, stream, _ = generate(uniform_server.url, text='ROMEO:', steps=6, temperature=1, seed=1, length=16)
    runs = runs_of(stream)
    vocab = runs['diffusion']['vocab']
    assert status == 200 and len(runs['diffusion']['frames']) == 7
    assert all(len(vocab) not in frame for frame in runs['diffusion']['frames'])
    assert all(run['done']['text'].startswith('ROMEO:') and len(run['done']['text']) == 16 for run in runs.values())


def test_page_second_request_waits_its_turn(uniform_server):
    """Two requests at once: the second, sent while the first generates, waits for it to end; both are answered in full."""
    first = connect(uniform_server.url, dict(text='', steps=100, temperature=1, seed=1, length=32))  # 101 uniform passes
    stream = events(first)
    got = [next(stream), next(stream)]
    assert 'frame' in got[-1]
    second = {}
    waiting = threading.Thread(target=lambda: second.update(zip(('status', 'stream', 'first'), generate(
        uniform_server.url, text='the', steps=4, temperature=1, seed=2, length=12))))
    sent = time.perf_counter()
    waiting.start()
    got += list(stream)
    ended = time.perf_counter()
    waiting.join(timeout=60)
    assert sent < ended and second['status'] == 200
    runs = runs_of(got)
    assert len(runs['diffusion']['frames']) == 101 and all(len(run['done']['text']) == 32 for run in runs.values())
    runs = runs_of(second['stream'])
    assert len(runs['diffusion']['frames']) == 5 and all(run['done']['text'].startswith('the') for run in runs.values())


def test_page_is_busy_and_a_closed_tab_stops_its_generation(uniform_server):
    """While a long generation runs (4,097 uniform steps: about a minute), its first frame came within a second; another
    request waits visualize.BUSY_WAIT seconds and is told the server is busy (503, one line). Closing the first
    connection (a closed tab) stops its generation at its next frame: the next request is served at once."""
    t0 = time.perf_counter()
    response = connect(uniform_server.url, dict(text='', steps=4096, temperature=1, seed=1, length=255))
    stream = events(response)
    assert 'vocab' in next(stream) and 'frame' in next(stream)
    assert time.perf_counter() - t0 < 1
    t1 = time.perf_counter()
    status, message, _ = generate(uniform_server.url, text='', steps=2, length=8)
    assert (status, message) == (503, 'busy: another generation is running; try again when it ends\n')
    assert time.perf_counter() - t1 >= visualize.BUSY_WAIT - 0.1
    response.close()  # and the socket with it: http.client's connection let go of it once the response began
    closed = time.perf_counter()
    status, stream, _ = generate(uniform_server.url, text='', steps=2, length=8)
    assert status == 200 and runs_of(stream)['diffusion']['done']['text']
    assert time.perf_counter() - closed < visualize.BUSY_WAIT + 2


class DevTools:
    """A page of headless Chromium, driven over the DevTools protocol: a websocket, spoken here with the standard library."""

    def __init__(self, url, user_dir, size=(1200, 660)):
        self.proc = subprocess.Popen(['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                                      '--disable-background-networking', '--disable-component-update', '--disable-sync',
                                      f'--user-data-dir={user_dir}', '--remote-debugging-port=0', f'--window-size={size[0]},{size[1]}',
                                      '--hide-scrollbars', url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:  # 'DevTools listening on ws://127.0.0.1:PORT/devtools/browser/...'
            m = re.search(r'DevTools listening on ws://([\d.]+):(\d+)/', line)
            if m:
                break
        else:
            raise AssertionError('chromium did not start: ' + self.proc.stderr.read())
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # its log, drained
        host, port = m[1], int(m[2])
        targets = json.load(urllib.request.urlopen(f'http://{host}:{port}/json/list', timeout=30))
        path = urlsplit(next(t for t in targets if t['type'] == 'page')['webSocketDebuggerUrl']).path
        self.sock = socket.create_connection((host, port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f'GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
                          f'Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n'.encode())
        self.buffer, self.id = b'', 0
        while b'\r\n\r\n' not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b'\r\n\r\n', 1)
        assert head.startswith(b'HTTP/1.1 101'), head

    def read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            assert chunk, 'chromium closed the websocket'
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def message(self):
        data = b''
        while True:  # frames until the last of a message; the server's are not masked
            first, second = self.read(2)
            n = second & 127
            n = struct.unpack('>H', self.read(2))[0] if n == 126 else struct.unpack('>Q', self.read(8))[0] if n == 127 else n
            data += self.read(n)
            if first & 0x80:
                return json.loads(data)

    def __call__(self, method, **params):
        """Send one command and wait for its answer (events in between are dropped)."""
        self.id += 1
        payload, mask = json.dumps(dict(id=self.id, method=method, params=params)).encode(), os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack('>H', n)  # a client masks its frames
        self.sock.sendall(bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            answer = self.message()
            if answer.get('id') == self.id:
                assert 'error' not in answer, answer
                return answer['result']

    def js(self, expression):
        return self('Runtime.evaluate', expression=expression, returnByValue=True, awaitPromise=True)['result'].get('value')

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f'waited {timeout} s for {expression}: state {self.js("document.body.dataset.state")}')

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self('Page.captureScreenshot', format='png')['data']))

    def close(self):
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


@pytest.mark.skipif(not shutil.which('chromium'), reason="needs Chromium, Debian's package: apt-get install -y chromium")
def test_page_in_headless_chromium(page_server, tmp_path):
    """A real browser: the page loads its settings, a click on generate writes a text the length asked for, the one the
    server streams for those settings; a template is filled in with its characters kept; a bad setting is the server's
    one line on the page. The decoding order is offered. ?step=K then holds both texts at the diffusion model's step K,
    masks still showing, and the screenshot of it is a PNG."""
    settings = dict(text='the cat', steps=8, temperature=1, seed=5, length=24)
    expected = runs_of(generate(page_server.url, **settings)[1])['diffusion']['done']['text']
    query = '&'.join(f'{k}={v}' for k, v in dict(settings, text='the%20cat', step=3).items())
    page = DevTools(f'{page_server.url}?{query}', tmp_path / 'profile')
    try:
        page.wait("document.body.dataset.state === 'ready'")
        assert page.js("document.getElementById('steps').value") == '8'
        # the decoding order, offered with diffusion.py's choices and default
        assert page.js("[...document.getElementById('order').options].map(o => o.value).join()") == ','.join(plumbing.ORDERS)
        assert page.js("document.getElementById('order').value") == diffusion.defaults['order']
        page.js("document.getElementById('generate').click()")
        assert page.wait("document.body.dataset.state !== 'running' && document.body.dataset.state") == 'done'
        assert page.js("document.getElementById('result').value") == expected
        # held at step 3 of 9 (?step=3): masks left in the diffusion model's text
        assert page.js("document.getElementById('diffusion-clock').textContent").startswith('step 3/9')
        assert '·' in page.js("document.getElementById('diffusion').textContent")
        page.screenshot(tmp_path / 'page.png')
        assert (tmp_path / 'page.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        page.js("document.getElementById('text').value = 'the ___ sat'; document.getElementById('generate').click()")
        page.wait("document.body.dataset.state === 'done' && document.getElementById('result').value.length === 11")
        text = page.js("document.getElementById('result').value")
        assert text[:4] == 'the ' and text[7:] == ' sat' and '_' not in text
        assert 'cannot fill in holes' in page.js("document.getElementById('GPT-stats').textContent")
        page.js("document.getElementById('steps').value = '0'; document.getElementById('generate').click()")
        page.wait("document.body.dataset.state === 'error'")
        assert page.js("document.getElementById('message').textContent") == '--steps must be at least 1'
    finally:
        page.close()


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads CPU time from /proc')
def test_page_server_stops_on_ctrl_c(page_server):
    """Ctrl-C mid-generation ends the server at once: exit 0, and nothing on stderr, no traceback from any request of the
    tests above either. (It stops this module's server: the last test of the page.)"""
    response = connect(page_server.url, dict(text='', steps=4096, temperature=1, seed=1, length=32))
    assert 'vocab' in next(events(response))
    page_server.proc.send_signal(signal.SIGINT)
    page_server.proc.wait(timeout=10)
    err = page_server.proc.stderr.read()
    assert page_server.proc.returncode == 0 and err == '', err
    response.close()


# -----------------------------------------------------------------------------
# 10. diffusion.c and the safetensors export: the C program's forward pass and samples against
# Python's, its flags and defaults, and files it cannot trust. Each test needing a C compiler is
# skipped, saying so, where none is found. The program is built once, into a temporary folder.

SAFETENSORS = REPO / 'weights' / 'diffusion.safetensors'
SANITIZERS = dict(ASAN_OPTIONS='detect_leaks=0:exitcode=99', UBSAN_OPTIONS='exitcode=98')
needs_cc = pytest.mark.skipif(visualize.c_compiler() is None, reason='no C compiler (cc, gcc or clang) found')


def compile_c(out, *flags):
    """(return code, stderr) of compiling diffusion.c into out with flags."""
    cmd = [visualize.c_compiler(), '-std=c11', *flags, '-o', str(out), str(REPO / 'diffusion.c'), '-lm']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return res.returncode, res.stderr


@pytest.fixture(scope='module')
def c_program(tmp_path_factory):
    """diffusion.c built once: -O3 and this CPU's vectors where the compiler takes them, one thread."""
    out = tmp_path_factory.mktemp('c') / 'diffusion'
    for flags in (['-O3', '-march=native'], ['-O3']):
        code, err = compile_c(out, *flags)
        if code == 0:
            return out
    pytest.fail(err)


@pytest.fixture(scope='module')
def c_sanitized(tmp_path_factory):
    """diffusion.c built with AddressSanitizer and UndefinedBehaviorSanitizer where the compiler
    supports them (any finding ends the run with exit code 99 or 98), else without."""
    out = tmp_path_factory.mktemp('c_asan') / 'diffusion'
    if compile_c(out, '-O1', '-g', '-fsanitize=address,undefined', '-fno-sanitize-recover=all')[0]:
        assert compile_c(out, '-O1')[0] == 0
    return out


def run_c(program, *args, sanitized=False, timeout=300):
    env = dict(ENV, **SANITIZERS) if sanitized else ENV
    return subprocess.run([str(program), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def c_error_line(res, code):
    """The program failed as it should: exit code, one 'error: ' line on stderr, nothing on stdout."""
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), res.stderr[-3000:]
    assert res.stdout == ''
    return lines[0]


def read_safetensors(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data, size=None):
    """A safetensors file of header and data (size: a header size other than the header's)."""
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    Path(path).write_bytes((len(text) if size is None else size).to_bytes(8, 'little') + text + data)


def random_model(seed=0, vocab='\nab cdéf.gß,', **config):
    """A diffusion model of another shape than the shipped one, with weights large enough that its
    outputs differ a lot from position to position, as a checkpoint dict."""
    torch.manual_seed(seed)
    config = dict(dict(vocab_size=len(vocab), n_layer=2, n_head=3, n_embd=36, block_size=40, dropout=0.0,
                       graph='absorb'), **config)
    model = diffusion.Transformer(diffusion.Config(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if 'ln' in name else 0.4 * torch.randn_like(p))
    return dict(kind='diffusion', config=config, vocab=vocab, model=model.state_dict(), format=plumbing.FORMAT,
                step=0, summary=dict(tokens=0, seconds=0.0))


@pytest.fixture(scope='module')
def small_export(tmp_path_factory):
    """A small random model exported to a safetensors file, and its checkpoint dict."""
    ckpt = random_model(vocab='\nabcdefghij', n_layer=1, n_head=2, n_embd=16, block_size=16)
    path = tmp_path_factory.mktemp('small') / 'small.safetensors'
    plumbing.export(str(path), ckpt, 'diffusion')
    return path, ckpt


@pytest.mark.parametrize('module', [gpt, diffusion], ids=['gpt', 'diffusion'])
def test_safetensors_export_loads_with_the_official_package(module, tmp_path, monkeypatch, capsys):
    """--export PATH.safetensors writes every weight of the checkpoint's model (diffusion.py's: the running average)
    in float32, as the safetensors package reads it, with the kind, format, config and vocabulary in its metadata,
    and a header padded with spaces to a multiple of 8 bytes."""
    safetensors = pytest.importorskip('safetensors', reason='the safetensors package is not installed')
    from safetensors.torch import load_file
    path = tmp_path / 'model.safetensors'
    monkeypatch.chdir(REPO)
    code, out, err = call_main(module, ['--ckpt', module.SHIPPED, '--export', path], monkeypatch, capsys)
    assert code == 0 and out == f'wrote {path}\n', err
    ckpt = torch.load(module.SHIPPED, weights_only=True)
    tensors = load_file(str(path))
    assert sorted(tensors) == sorted(ckpt['model']) and all(t.dtype == torch.float32 for t in tensors.values())
    for name, weight in ckpt['model'].items():
        assert torch.equal(tensors[name], weight.float()), name
    with safetensors.safe_open(str(path), 'pt') as f:
        meta = f.metadata()
    assert meta['kind'] == module.KIND and meta['format'] == str(ckpt.get('format', 1)) and meta['vocab'] == ckpt['vocab']
    assert json.loads(meta['config']) == ckpt['config']
    n = int.from_bytes(path.read_bytes()[:8], 'little')
    assert n % 8 == 0 and path.stat().st_size == 8 + n + 4 * sum(w.numel() for w in ckpt['model'].values())


def test_shipped_safetensors_is_the_export_of_the_shipped_checkpoint():
    """weights/diffusion.safetensors is, byte for byte, what --export writes from weights/diffusion.pt: the two
    files hold the same weights, config and vocabulary."""
    ckpt = torch.load(REPO / diffusion.SHIPPED, weights_only=True)
    assert plumbing.safetensors_bytes(ckpt, 'diffusion') == SAFETENSORS.read_bytes()


@needs_cc
@pytest.mark.parametrize('flags', [[], ['-fopenmp']], ids=['plain', 'openmp'])
def test_c_builds_without_warnings(flags, tmp_path):
    """diffusion.c is C11 that the compiler takes without a warning under -Wall -Wextra -pedantic, with OpenMP or
    without (the README's build line), in at most 500 lines of at most 100 characters."""
    if flags and compile_c(tmp_path / 'probe', '-fopenmp')[0]:
        pytest.skip('this compiler has no OpenMP')
    assert compile_c(tmp_path / 'diffusion', '-O1', '-Wall', '-Wextra', '-pedantic', *flags) == (0, '')
    lines = (REPO / 'diffusion.c').read_text().splitlines()
    assert len(lines) <= 500 and max(map(len, lines)) <= 100


def c_logprobs(program, path, text):
    res = run_c(program, path, '--logprobs', text)
    assert res.returncode == 0, res.stderr
    return torch.tensor([[float(v) for v in line.split()] for line in res.stdout.splitlines()])


@needs_cc
@pytest.mark.parametrize('case', ['shipped', 'random-other-shape'])
def test_c_forward_equals_transformer_forward(case, c_program, tmp_path):
    """./diffusion --logprobs TEXT prints log p(x_0 = y | x_t) of characters 1..T-1 after the start token, '_' the
    mask: Transformer.forward's output plus log(e^sigma_bar - 1), within 1e-4, on the shipped weights (a whole
    context) and on a random model of another shape (3 heads of 12 channels, 2 layers, a vocabulary with
    characters beyond ASCII)."""
    if case == 'shipped':
        model, ckpt = diffusion.load_checkpoint(str(REPO / diffusion.SHIPPED))
        path, length = SAFETENSORS, 255
    else:
        ckpt = random_model()
        model = diffusion.Transformer(diffusion.Config(**ckpt['config']))
        model.load_state_dict(ckpt['model'])
        path, length = tmp_path / 'random.safetensors', 39
        plumbing.export(str(path), ckpt, 'diffusion')
    vocab, rng = ckpt['vocab'], random.Random(0)
    text = ''.join('_' if rng.random() < 0.4 else rng.choice(vocab) for _ in range(length))
    ids = torch.tensor([[0] + [len(vocab) if c == '_' else vocab.index(c) for c in text]])
    with torch.no_grad():
        expected = model.eval()(ids, torch.tensor([0.7]))[0] + math.log(math.expm1(0.7))
    got = c_logprobs(c_program, path, text)
    assert got.shape == expected.shape == (length, len(vocab))
    assert (got - expected).abs().max() < 1e-4
    assert expected.std(0).mean() > 0.5  # outputs that differ from position to position: the check bites


@needs_cc
def test_c_samples_the_model_you_train_and_export(c_program, trained, tmp_path, monkeypatch, capsys):
    """python diffusion.py --export x.safetensors, then ./diffusion x.safetensors: by default one context of the
    trained model's characters after the start token (31 here), and the timing line of diffusion.py."""
    workdir, _ = trained
    monkeypatch.chdir(workdir)
    path = tmp_path / 'x.safetensors'
    assert call_main(diffusion, ['--export', path], monkeypatch, capsys)[0] == 0
    res = run_c(c_program, path, '--steps', 8)
    assert res.returncode == 0, res.stderr
    vocab = json.loads((workdir / 'data' / 'meta.json').read_text())['vocab']
    assert len(res.stdout) == 32 and res.stdout.endswith('\n') and set(res.stdout) <= set(vocab)
    assert re.fullmatch(r'1 x 31 characters in [0-9.]+ s, [0-9]+ forward passes, about [0-9.e+]+ GFLOPs\n',
                        res.stderr), res.stderr


@needs_cc
def test_c_defaults_are_python_defaults(c_program, capsys):
    """./diffusion --help states the defaults of python diffusion.py (its `defaults`, else its parser's): steps,
    temperature, seed and, where diffusion.py has them, the order and its noise; without --length both write one
    context after the start token."""
    res = run_c(c_program, '--help')
    assert res.returncode == 0
    c = dict(re.findall(r'--([a-z-]+) [^(]*\(default: ([^)]+)\)', res.stdout))
    python = plumbing.parser(diffusion.__doc__, diffusion.defaults, diffusion.SHIPPED).parse_args([])
    compared = 0
    for flag, value in c.items():
        name = flag.replace('-', '_')
        default = diffusion.defaults.get(name, getattr(python, name, None))
        if default is not None:
            assert (float(value) == default if isinstance(default, (int, float)) else value == default), flag
            compared += 1
    assert compared >= 4 and {'steps', 'temperature', 'seed', 'num-samples'} <= set(c)
    python_length, _ = plumbing.given(python, torch.load(diffusion.SHIPPED, weights_only=True)['vocab'], 256)
    res = run_c(c_program, '--steps', 1)
    assert len(res.stdout) - 1 == python_length == 255 and '1 x 255 characters' in res.stderr


@needs_cc
@pytest.mark.parametrize('order', ['random', diffusion.defaults['order']])
def test_c_samples_score_like_python_samples(order, c_program):
    """32 samples of 24 characters at 8 steps from ./diffusion and from diffusion.generate, in the Tweedie sampler's
    random order and in the default one, scored by the shipped GPT: their mean generative bits/char within two
    standard errors (of the difference) of each other. Random characters score many standard errors worse, so the
    check can fail."""
    length, steps, n, noise = 24, 8, 32, diffusion.defaults['confidence_noise']
    res = run_c(c_program, '--num-samples', n, '--length', length, '--steps', steps, '--seed', 3, '--order', order,
                '--confidence-noise', noise)
    assert res.returncode == 0, res.stderr
    texts = samples_of(res.stdout, n)
    judge, ckpt = gpt.load_checkpoint(str(REPO / gpt.SHIPPED))
    model, _ = diffusion.load_checkpoint(str(REPO / diffusion.SHIPPED))
    vocab = ckpt['vocab']
    assert len(texts) == n and all(len(t) == length for t in texts) and len(set(texts)) == n
    c = torch.tensor([[vocab.index(ch) for ch in t] for t in texts])
    torch.manual_seed(3)
    python = diffusion.generate(model.eval(), n, length, steps, order=order, confidence_noise=noise)
    noise = torch.randint(len(vocab), (n, length), generator=torch.Generator().manual_seed(3))
    bits = {name: visualize.generative_bits(judge.eval(), x) for name, x in
            (('c', c), ('python', python), ('noise', noise))}
    mean = {name: float(b.mean()) for name, b in bits.items()}
    se = {name: float(b.std() / math.sqrt(n)) for name, b in bits.items()}
    assert abs(mean['c'] - mean['python']) < 2 * math.hypot(se['c'], se['python']), (mean, se)
    assert mean['noise'] - mean['c'] > 6 * math.hypot(se['c'], se['noise']), (mean, se)


@needs_cc
@pytest.mark.parametrize('order', ['random', 'confidence', 'left-to-right'])
def test_c_infill_keeps_every_given_character(order, c_program):
    """--infill keeps every character outside the holes and fills every hole with a character of the model, in
    every --order; samples are separated as diffusion.py separates them."""
    template = 'ROMEO:____________JULIET:'
    res = run_c(c_program, '--infill', template, '--num-samples', 3, '--steps', 16, '--order', order)
    assert res.returncode == 0, res.stderr
    vocab = torch.load(diffusion.SHIPPED, weights_only=True)['vocab']
    texts = samples_of(res.stdout, 3)
    assert '3 x 25 characters' in res.stderr
    for text in texts:
        assert len(text) == len(template) and set(text) <= set(vocab)
        assert all(c == t for c, t in zip(text, template) if t != '_')


@needs_cc
@pytest.mark.parametrize('order', ['confidence', 'left-to-right'])
def test_c_orders_unmask_on_schedule(order, c_program):
    """With --order confidence or left-to-right and as many steps as free positions, round(F ts[s + 1] / ts[0])
    masks stay after step s: every step unmasks exactly one, so every step but the last changes the text and
    the network runs at each: steps + 1 passes. The random order at 4 times as many steps skips many."""
    res = run_c(c_program, '--length', 20, '--steps', 20, '--order', order)
    assert ', 21 forward passes' in res.stderr, res.stderr
    res = run_c(c_program, '--length', 20, '--steps', 80)
    passes = int(re.search(r'([0-9]+) forward passes', res.stderr)[1])
    assert passes <= 21 < 81


BAD_C_FLAGS = [['--bogus', '1'], ['--steps', '0'], ['--steps', 'abc'], ['--steps', '1.5'], ['--steps'],
               ['--length', '256'], ['--length', '0'], ['--num-samples', '0'], ['--temperature', 'nan'],
               ['--temperature', '0'], ['--seed', '-1'], ['--confidence-noise', '-1'], ['--order', 'sideways'],
               ['--infill', 'no holes'], ['--infill', 'Zoë __'], ['--infill', '_' * 256], ['--infill', 'a_', '--length', '5'],
               [str(SAFETENSORS), str(SAFETENSORS)]]


@needs_cc
@pytest.mark.parametrize('argv', BAD_C_FLAGS, ids=lambda argv: ' '.join(argv)[:30])
def test_c_bad_flags_give_one_line(argv, c_program):
    """A bad flag or value is one 'error:' line and exit code 2, as in python diffusion.py, naming what is wrong."""
    line = c_error_line(run_c(c_program, *argv), 2)
    assert argv[0] in line or 'give one file' in line, line


def damaged(case, path, small):
    """Write at path the small export damaged as case says; the expected words of the error."""
    src, ckpt = small
    raw = Path(src).read_bytes()
    header, data = read_safetensors(src)
    meta, config = header['__metadata__'], json.loads(header['__metadata__']['config'])
    if case == 'empty':
        path.write_bytes(b'')
    elif case == 'truncated-size':
        path.write_bytes(raw[:5])
    elif case == 'truncated-data':
        path.write_bytes(raw[:-7])
    elif case == 'header-size-beyond-file':
        path.write_bytes((len(raw) - 7).to_bytes(8, 'little') + raw[8:])
    elif case == 'malformed-json':
        path.write_bytes(raw.replace(b'"shape":', b'"shape"', 1))
    elif case == 'header-not-an-object':
        write_safetensors(path, [header], data)
    elif case == 'deeply-nested':
        text = b'{"a":' + b'[' * 100000 + b']' * 100000 + b'}'
        path.write_bytes(len(text).to_bytes(8, 'little') + text)
    elif case == 'nul-in-header':
        n = int.from_bytes(raw[:8], 'little')
        path.write_bytes(raw[:8 + n - 1] + b'\0' + raw[8 + n:])
    else:
        if case == 'tensor-missing':
            del header['ln_f.weight']
        elif case == 'wrong-dtype':
            header['head.weight']['dtype'] = 'F16'
        elif case == 'wrong-shape':
            header['head.weight']['shape'] = header['head.weight']['shape'][::-1]
        elif case == 'offsets-outside':
            header['head.weight']['data_offsets'][1] += 4
        elif case == 'offsets-negative':
            header['wte.weight']['data_offsets'][0] = -4
        elif case == 'no-metadata':
            del header['__metadata__']
        elif case == 'kind-gpt':
            meta['kind'] = 'gpt'
        elif case == 'format-1':
            meta['format'] = '1'
        elif case == 'graph-uniform':
            config['graph'] = 'uniform'
        elif case == 'config-not-json':
            meta['config'] = '{"n_layer": 1,'
        elif case.startswith('config-'):
            key, value = case[len('config-'):].split('=')
            config[key] = json.loads(value)
        elif case == 'vocab-short':
            meta['vocab'] = meta['vocab'][:-1]
        elif case == 'vocab-long':
            meta['vocab'] += 'z'
        meta['config'] = meta['config'] if case == 'config-not-json' else json.dumps(config)
        write_safetensors(path, header, data)


BAD_FILES = ['missing', 'folder', 'empty', 'truncated-size', 'truncated-data', 'header-size-beyond-file', 'malformed-json',
             'header-not-an-object', 'deeply-nested', 'nul-in-header', 'tensor-missing', 'wrong-dtype', 'wrong-shape',
             'offsets-outside', 'offsets-negative', 'no-metadata', 'kind-gpt', 'format-1', 'graph-uniform',
             'config-not-json', 'config-n_layer=0', 'config-n_head=0', 'config-n_embd=18', 'config-vocab_size=70000',
             'config-block_size=1', 'config-n_embd=1e9', 'config-n_layer=-1', 'config-n_layer="1"', 'vocab-short',
             'vocab-long']


@needs_cc
@pytest.mark.parametrize('case', BAD_FILES)
def test_c_bad_file_gives_one_line(case, c_sanitized, small_export, tmp_path):
    """A file that cannot be trusted is one 'error:' line naming it and exit code 1, never a crash: with the
    sanitizers, never a finding either."""
    path = tmp_path / 'bad.safetensors'
    if case == 'folder':
        path.mkdir()
    elif case != 'missing':
        damaged(case, path, small_export)
    line = c_error_line(run_c(c_sanitized, path, '--steps', 2, sanitized=True), 1)
    assert str(path) in line, line


@needs_cc
def test_c_fuzzed_files_never_crash(c_sanitized, small_export, tmp_path):
    """300 corrupted copies of a small export: truncated at random points, random bytes of the header and its size
    changed, and tensors' offsets and shapes changed. Each run either samples (a change the file cannot show, such
    as another character) or ends with one 'error:' line and exit code 1; never a signal, never a sanitizer
    finding. Every changed offset or shape is refused."""
    src, _ = small_export
    raw = Path(src).read_bytes()
    header, data = read_safetensors(src)
    n, rng = int.from_bytes(raw[:8], 'little'), random.Random(0)
    cases = []
    for k in range(100):
        cases.append(('truncated', raw[:rng.randrange(len(raw))]))
    for k in range(120):
        damaged_raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            damaged_raw[rng.randrange(8 + n)] = rng.randrange(256)
        cases.append(('flipped', bytes(damaged_raw)))
    names = [k for k in header if k != '__metadata__']
    for k in range(80):
        h = json.loads(json.dumps(header))
        t = h[rng.choice(names)]
        shape, offsets = t['shape'], t['data_offsets']
        change = rng.choice(['shape-dim', 'shape-rank', 'shape-swap', 'offset-shift', 'offset-end', 'offset-big',
                             'offset-swap', 'offset-type'])
        if change == 'shape-dim':
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 1000, 2 ** 40])
        elif change == 'shape-rank':
            t['shape'] = shape + [1] if rng.random() < 0.5 else shape[1:]
        elif change == 'shape-swap':
            t['shape'] = [shape[-1] + 1] + shape[:-1]
        elif change == 'offset-shift':
            offsets[1] += rng.choice([-4, 4, 1])
        elif change == 'offset-end':
            t['data_offsets'] = [len(data), len(data) + offsets[1] - offsets[0]]
        elif change == 'offset-big':
            t['data_offsets'] = [offsets[0], offsets[0] + 2 ** 62]
        elif change == 'offset-swap':
            t['data_offsets'] = offsets[::-1] if offsets[0] != offsets[1] else [1, 0]
        else:
            t['data_offsets'] = [str(offsets[0]), offsets[1]]
        text = json.dumps(h).encode()
        text += b' ' * (-len(text) % 8)
        cases.append(('structured', len(text).to_bytes(8, 'little') + text + data))
    assert len(cases) >= 200
    path, refused = tmp_path / 'fuzzed.safetensors', 0
    for kind, content in cases:
        path.write_bytes(content)
        res = run_c(c_sanitized, path, '--steps', 2, '--length', 4, sanitized=True)
        assert res.returncode in (0, 1), (kind, res.returncode, res.stderr[-3000:])
        if res.returncode == 1:
            c_error_line(res, 1)
            refused += 1
        else:
            assert kind != 'structured' and len(res.stdout) >= 5 and 'forward passes' in res.stderr, (kind, res)
    assert refused > 0.8 * len(cases)


@needs_cc
def test_benchmark_c_compares_the_two_programs(monkeypatch, capsys):
    """visualize.py --benchmark-c builds diffusion.c, runs it and python diffusion.py on the same weights, and
    prints for each the whole-process and sampling seconds, passes and GFLOP/s, and their ratio."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    args = visualize.parse_args(['--benchmark-c', '--steps', '4', '--length', '64', '--diffusion-ckpt',
                                 str(REPO / diffusion.SHIPPED)])
    capsys.readouterr()
    visualize.benchmark_c(args, runs=1)
    out = capsys.readouterr().out
    rows = re.findall(r'^\| `(\./diffusion|python diffusion\.py)[^|]*\| ([0-9.]+) \| ([0-9.]+) \| ([0-9]+) \| ([0-9.]+) \|$',
                      out, re.M)
    assert [r[0] for r in rows] == ['./diffusion', 'python diffusion.py'], out
    for _, whole, seconds, passes, rate in rows:
        assert float(whole) >= float(seconds) and 1 <= int(passes) <= 5 and float(rate) > 0
    assert re.search(r'C reaches [0-9.]+ of the GFLOP/s of PyTorch', out)


def test_dtype_flag_chooses_the_precision(monkeypatch, capsys):
    """--dtype float32 or bfloat16 (both scripts) overrides the choice of precision(): float32 even where bfloat16 is
    native, bfloat16 even where it would be emulated; without it precision() chooses as before. Another value is
    one line."""
    monkeypatch.setattr(plumbing, 'DTYPE', None)
    a = torch.randn(8, 8)
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
        for module in (gpt, diffusion):
            for dtype, expected in (('float32', torch.float32), ('bfloat16', torch.bfloat16),
                                    (None, torch.bfloat16 if native else torch.float32)):
                module.parse_args(['--dtype', dtype] if dtype else [])
                assert plumbing.precision('cpu') == expected
                with plumbing.autocast('cpu'):
                    assert (a @ a).dtype == expected
    with pytest.raises(SystemExit) as e:
        diffusion.parse_args(['--dtype', 'float16'])
    one_error_line(e.value.code, capsys.readouterr().err, '--dtype', 'float32 or bfloat16')
