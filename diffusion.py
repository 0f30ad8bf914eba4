"""
A character-level Score Entropy Discrete Diffusion model (SEDD, arXiv:2310.16834) made from the
GPT of gpt.py and its weights: it says how much likelier noisy text is with one character changed.

    python diffusion.py --train     start from the GPT, train on data/, save out/diffusion.pt
    python diffusion.py             sample from out/diffusion.pt, or the shipped weights
    python diffusion.py --eval      validation NELBO (a bound on the NLL) in bits per character
    python diffusion.py --infill "ROMEO:____________JULIET:"   fill in the _, both sides in view

`diff gpt.py diffusion.py` shows every change that turns this model into a diffusion model.
"""
import plumbing  # first: from here on, Ctrl-C stops quietly, while torch loads too
import copy
import functools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from plumbing import autocast, die, measure

KIND = 'diffusion'
# hyperparameters; every one can be overridden on the command line, e.g. --max-iters 500
defaults = dict(
    n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.0, graph='absorb',  # diffusion
    batch_size=32, max_iters=3600, lr=5e-4, min_lr=1e-4, warmup_iters=100,  # diffusion: lower lr
    weight_decay=0.1, grad_clip=1.0, grad_accum=1,  # grad_accum: batches per step and process
    eval_interval=250, eval_iters=20, seed=1337,  # bookkeeping
    data_dir='data', out=f'out/{KIND}.pt', device=plumbing.best_device(),
    temperature=1.0, order='confidence', confidence_noise=2.0,  # diffusion: sampling, see generate
)
SHIPPED = f'weights/{KIND}.pt'
EMA_DECAY = 0.999  # diffusion: samples come from an average of the last ~1,000 steps' weights

# -----------------------------------------------------------------------------
# data

def load_data(data_dir):
    # prepare.py wrote the text as uint16 token ids, and the vocabulary that maps them to characters
    vocab, files = plumbing.data_files(data_dir)
    return vocab, {s: np.fromfile(path, dtype=np.uint16) for s, path in files.items()}

EXTRA = 0  # diffusion: a window is its own target, its first character given

def get_batch(data, batch_size, block_size, generator):
    ix = torch.randint(len(data) - block_size - EXTRA + 1, (batch_size,), generator=generator)
    windows = [data[i:i + block_size + EXTRA].astype(np.int64) for i in ix.tolist()]
    return torch.from_numpy(np.stack(windows))  # (B, T + EXTRA)

def val_windows(data, block_size):
    # non-overlapping windows covering the validation text, so --eval is deterministic
    n = (len(data) - EXTRA) // block_size
    text = torch.from_numpy(data[:n * block_size + EXTRA].astype(np.int64))
    return text.unfold(0, block_size + EXTRA, block_size)  # (n, T + EXTRA)

# -----------------------------------------------------------------------------
# model

@dataclass
class Config:
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    dropout: float = 0.0
    graph: str = 'absorb'  # diffusion: the forward process, 'uniform' (Q = J/N - I) or 'absorb'

CAUSAL = False  # diffusion: every position attends to the whole sequence

@functools.lru_cache(maxsize=1024)  # the same angles for every layer and pass: compute once
def rotary_angles(start, T, hs, device, dtype):
    freqs = 10000.0 ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
    angles = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None] * freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)  # (T, hs / 2)

def rotary(q, k, start=0):
    # rotary position embeddings: rotate pairs of channels by an angle proportional to the
    # position (start, start + 1, ...), so attention sees how far apart two characters are
    cos, sin = rotary_angles(start, q.shape[-2], q.shape[-1], q.device, q.dtype)
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotate(q), rotate(k)

class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        # (B, nh, T, hs) each
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(C, dim=2))
        q, k = rotary(q, k)
        # no attention dropout: it halves the speed on a CPU
        y = F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        absorb = config.graph == 'absorb'
        self.wte = nn.Embedding(config.vocab_size + absorb, config.n_embd)  # diffusion: + mask
        if not absorb:  # diffusion: the noise level, see forward
            self.noise_mlp = nn.Sequential(nn.Linear(64, config.n_embd), nn.SiLU(),
                                           nn.Linear(config.n_embd, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # GPT-2's initialisation, with the residual projections scaled down by depth
        for name, p in self.named_parameters():
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                deep = name.endswith('c_proj.weight')
                std = 0.02 / math.sqrt(2 * config.n_layer) if deep else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, sigma_bar):
        """Log concrete scores log s(x_t)_y of characters 1..T-1, every y: (B, T - 1, V)."""
        x = self.wte(idx)  # (B, T, C)
        # diffusion: the uniform graph's score depends on the noise level: the network is told it.
        # Absorb's is p(x_0 = y | x_t) / (e^sigma_bar - 1), and p(x_0 | x_t) needs no noise level.
        if self.config.graph == 'uniform':
            x = x + self.noise_mlp(noise_features(sigma_bar))[:, None]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.ln_f(x)).float()  # (B, T, V)
        if self.config.graph == 'absorb':  # the GPT's shift: position i scores character i + 1
            return out[:, :-1].log_softmax(-1) - torch.log(torch.expm1(sigma_bar))[:, None, None]
        return out.scatter(-1, idx[..., None], 0.0)[:, 1:]  # s = 1 at y = x_t; no shift

def noise_features(sigma_bar):
    # 64 sinusoidal features of log sigma_bar, periods 0.6 to 600 (log sigma_bar: -9 to 3)
    freqs = 10 ** torch.linspace(1, -2, 32, device=sigma_bar.device)
    angles = torch.log(sigma_bar.float())[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 64)

# -----------------------------------------------------------------------------
# noise schedule, forward process, score entropy (diffusion only; docs/math.md derives them)

SIGMA_MIN, SIGMA_MAX = 1e-4, 20.0
T_EPS = 1e-5  # keeps t inside (0, 1), where every sigma_bar is finite and positive

def noise(t, graph):
    """Total noise sigma_bar(t) and its rate sigma(t) = d sigma_bar / dt."""
    if graph == 'uniform':  # geometric: sigma_bar(t) = smin^(1-t) smax^t
        sigma_bar = SIGMA_MIN ** (1 - t) * SIGMA_MAX ** t
        return sigma_bar, sigma_bar * math.log(SIGMA_MAX / SIGMA_MIN)
    return -torch.log1p(-t), 1 / (1 - t)  # absorb, log-linear: masked with probability t

def forward_probs(x0, sigma_bar, graph, vocab_size):
    """p_t|0(y | x_0) = exp(sigma_bar Q)(y, x_0), every character y (and mask): (B, T, N (+ 1))."""
    stay = torch.exp(-sigma_bar)[:, None, None]  # x_0 is kept with probability e^-sigma_bar
    moved = -torch.expm1(-sigma_bar)[:, None, None]  # 1 - e^-sigma_bar, exact for small sigma_bar
    if graph == 'absorb':  # or else masked
        return torch.cat([stay * F.one_hot(x0, vocab_size), moved.expand(*x0.shape, 1)], dim=-1)
    return moved / vocab_size + stay * F.one_hot(x0, vocab_size)  # uniform, Eq. 3: or redrawn

def perturb(x0, sigma_bar, graph, vocab_size):
    """Draw x_t ~ p_t|0(. | x_0) independently at every position."""
    probs = forward_probs(x0, sigma_bar, graph, vocab_size)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)  # a draw in proportion

def score_entropy(log_score, sigma_bar, x_t, x0, graph):
    """Score entropy at every position, Eq. 7 without its factor sigma(t): (B, T). It sums over
    y != x_t the rate Q(x_t, y) times s_y - a_y log s_y + a_y (log a_y - 1), a Bregman divergence
    (>= 0, and 0 exactly when s_y = a_y) from the ratio a_y = p_t|0(y | x_0) / p_t|0(x_t | x_0)."""
    N = log_score.shape[-1]
    probs = forward_probs(x0, sigma_bar, graph, N)
    p_x_t = probs.gather(-1, x_t[..., None])  # (B, T, 1), 0 where x_0 cannot reach x_t (absorb)
    a = probs[..., :N] / torch.where(p_x_t > 0, p_x_t, 1.0)  # (B, T, N)
    terms = log_score.exp() - torch.where(a > 0, a * log_score, 0.0) + torch.xlogy(a, a) - a
    terms = torch.where(F.one_hot(x_t, probs.shape[-1])[..., :N] == 1, 0.0, terms)  # y != x_t
    # the rate Q(x_t, y) of y -> x_t. Absorb: 1 into the mask, 0 into a character. Uniform: 1/N
    # (Q = J/N - I; the annotated notebook's 1/(N - 1) makes its loss N/(N-1) times the bound)
    rate = (x_t == N).to(a) if graph == 'absorb' else 1 / N
    return torch.where(p_x_t[..., 0] > 0, rate * terms.sum(-1), 0.0)  # there 0, as in SEDD's code

def loss_fn(model, batch):
    """Diffusion-weighted score entropy in nats/char: its mean over t bounds -log p(x_1..T-1 | x_0)
    / (T - 1) (the NELBO), less the prior term KL(p_1|0 || p_base): 0 for absorb, < 1e-7 uniform."""
    B, graph = batch.shape[0], model.config.graph
    t = (torch.arange(B) + torch.rand(B)).to(batch.device) / B  # stratified: one t per 1/B
    sigma_bar, sigma = noise(t.clamp(T_EPS, 1 - T_EPS), graph)
    x0 = batch[:, 1:]  # character 0 is given, as the GPT's first one is, and never noised
    x_t = torch.cat([batch[:, :1], perturb(x0, sigma_bar, graph, model.config.vocab_size)], 1)
    log_score = model(x_t, sigma_bar)  # (B, T - 1, V)
    return (sigma[:, None] * score_entropy(log_score, sigma_bar, x_t[:, 1:], x0, graph)).mean()

# -----------------------------------------------------------------------------
# training

def get_lr(it, args):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)

@torch.no_grad()
def estimate_loss(model, split, args):
    model.eval()
    out = {}
    # fork_rng leaves the training's random numbers alone, so resuming is exact
    with torch.random.fork_rng(), autocast(args.device):
        generator = torch.Generator().manual_seed(args.seed)  # the same batches every time
        for name, data in split.items():
            batches = [get_batch(data, args.batch_size, model.config.block_size, generator)
                       for _ in range(args.eval_iters)]
            losses = [loss_fn(model, batch.to(args.device)).item() for batch in batches]
            out[name] = float(np.mean(losses)) / math.log(2)
    model.train()
    return out

def train(args):
    rank, world = plumbing.start_processes(args)  # torchrun starts one process per device
    vocab, split = load_data(args.data_dir)
    plumbing.check_training(args, split, EXTRA)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = plumbing.model_config(Config, vocab, args)
    ckpt = None
    if args.resume:
        config, ckpt = plumbing.resumable(args, vocab, load_checkpoint)
    model = Transformer(config).to(args.device)
    if not args.resume:  # diffusion: from the GPT: the same network but for full attention and
        model.load_state_dict(plumbing.start_weights(args.init, model, vocab))  # the mask's row
    ema = copy.deepcopy(model)  # diffusion: a running average of the weights samples better
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)
    states = dict(model=ema, raw=model, optimizer=optimizer)  # diffusion: 'model' is the average
    step, summary = plumbing.restore(args, ckpt, generator, states)
    save = plumbing.saver(args, KIND, config, vocab, generator, states)
    print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}')
    ddp_model = plumbing.distribute(model)  # with torchrun, backward() averages the gradients
    stop = plumbing.StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, then stop
    tokens = args.batch_size * args.grad_accum * world * config.block_size  # per step, all ranks
    progress, stopping = plumbing.Progress(args, summary, tokens, get_lr), False
    while step < args.max_iters and not stopping:
        optimizer.param_groups[0]['lr'] = get_lr(step, args)
        # the mean gradient of grad_accum batches, one after the other
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=args.device)
        for micro_step in range(args.grad_accum):
            batch = get_batch(split['train'], args.batch_size, config.block_size, generator)
            plumbing.sync_gradients(ddp_model, micro_step == args.grad_accum - 1)
            with autocast(args.device):
                micro_loss = loss_fn(ddp_model, batch.to(args.device)) / args.grad_accum
            micro_loss.backward()
            loss += micro_loss.detach()
        # every rank learns the mean loss, and whether any of them was asked to stop
        loss, stopping = stop.agree(loss, step, args.device)
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        plumbing.update_average(ema, model, step, EMA_DECAY)  # diffusion
        step += 1
        progress.step(step, loss)
        # rank 0 evaluates and saves
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_iters or stopping):
            losses = estimate_loss(ema, split, args)  # diffusion: of the average
            print(f'step {step}: train {losses["train"]:.3f}, val {losses["val"]:.3f} bits/char')
            save(step, summary, losses['val'])
            progress.pause()
    if rank == 0 and step == args.max_iters:  # the figure stored with the model: all of val
        save(step, summary, evaluate(ema, args))  # diffusion: of the average
    plumbing.finish(args, step, stopping)

def evaluate(model, args):
    """Validation loss in bits/char over every full batch of non-overlapping validation windows."""
    windows = val_windows(load_data(args.data_dir)[1]['val'], model.config.block_size)
    # diffusion: its loss draws t and x_t at random: the mean of many draws, the same every time
    return plumbing.evaluate(model, loss_fn, windows, args, 'validation NELBO', args.eval_passes)

# -----------------------------------------------------------------------------
# checkpoints

def load_checkpoint(path):
    return plumbing.load_checkpoint(path, KIND, lambda config: Transformer(Config(**config)))

def default_checkpoint(out):
    return out if os.path.exists(out) else SHIPPED  # your own training run wins over the shipped

# -----------------------------------------------------------------------------
# sampling

def tweedie_probs(score, x, dsigma, graph):
    """Unnormalised p(x_{t-dt} = y | x_t) = [exp(-dsigma Q) s]_y exp(dsigma Q)(x_t, y), Eq. 8."""
    N = score.shape[-1]
    if graph == 'absorb':
        # worked out: a mask becomes y with probability (e^dsigma - 1) s_y; characters stay
        unmask = torch.expm1(dsigma) * score
        probs = torch.cat([unmask, 1 - unmask.sum(-1, keepdim=True)], dim=-1)
        return torch.where((x == N)[..., None], probs, F.one_hot(x, N + 1).to(probs))
    mean = score.mean(-1, keepdim=True)  # uniform: exp(+-dsigma Q) = J/N + e^-+dsigma (I - J/N)
    staggered = mean + dsigma.exp() * (score - mean)  # exp(-dsigma Q) s, the "staggered score"
    transition = -torch.expm1(-dsigma) / N + (-dsigma).exp() * F.one_hot(x, N)
    return staggered * transition

def reveal(logits, x, left, order, confidence_noise):
    """Reveal the masks of x (B, T) in an order, all but `left` (B,) of them: each is drawn from
    p(x_0 | x_t) = softmax(logits), and 'confidence' reveals the likeliest draws first (plus
    confidence_noise x Gumbel noise: 0 is greedy, large a random order), 'left-to-right' the
    leftmost. Masks revealed in one step are drawn independently, blind to each other: the fewer
    per step, the closer to the model's joint distribution."""
    N, masked = logits.shape[-1], x == logits.shape[-1]
    log_p = logits.log_softmax(-1)  # (B, T, N)
    drawn = (log_p.exp() / torch.empty_like(log_p).exponential_()).argmax(-1)  # (B, T)
    if order == 'confidence':
        gumbel = -torch.empty_like(x, dtype=log_p.dtype).exponential_().log()
        priority = log_p.gather(-1, drawn[..., None])[..., 0] + confidence_noise * gumbel
    else:  # left to right
        priority = -torch.arange(x.shape[1], device=x.device).to(log_p).expand(x.shape)
    rank = priority.masked_fill(~masked, -math.inf).argsort(-1, descending=True).argsort(-1)
    revealed = rank < (masked.sum(-1) - left)[:, None]  # (B, T): masked and first in the order
    return torch.where(revealed, drawn, x)

@torch.no_grad()
def generate(model, num_samples, length, steps=128, temperature=1.0, device='cpu', callback=None,
             given=None, order='random', confidence_noise=0.0):
    """Denoise every position at once with the Tweedie sampler; callback(step, x) sees each step.
    given: (length,) token ids to keep, and the mask id N where to generate (by default, all).
    A longer text is made window by window, each half a context on (the last ends with the text).
    order (absorbing graph): which masks a step reveals. 'random': each with the Tweedie step's
    probability. 'confidence' and 'left-to-right': as many as the schedule expects, see reveal."""
    N, graph, block = model.config.vocab_size, model.config.graph, model.config.block_size
    if graph == 'uniform' and order != 'random':
        raise ValueError('the uniform graph has no masks to order: use order="random"')
    x = torch.full((length,), N) if given is None else given
    # token 0 ('\n' in Shakespeare) starts every sample
    x = torch.cat([torch.zeros(1, dtype=torch.long), x]).to(device).repeat(num_samples, 1)
    ts = torch.linspace(1 - T_EPS, T_EPS, steps + 1, device=device)
    sigma_bars = torch.cat([noise(ts, graph)[0], torch.zeros(1, device=device)])  # ends at 0
    masked_after = torch.cat([ts[1:] / ts[0], torch.zeros(1, device=device)])  # share of masks
    for start in [*range(0, x.shape[1] - block, block - block // 2), max(x.shape[1] - block, 0)]:
        kept = x[:, start:start + block].clone()  # (B, T)
        free, x_t, fed = kept == N, kept, torch.full_like(kept, -1)  # fed: what the network saw
        if graph == 'uniform':  # its noise is random characters
            x_t = torch.where(free, torch.randint(N, kept.shape, device=device), kept)
        out = torch.empty(len(kept), kept.shape[1] - 1, N, device=device)  # (B, T - 1, N)
        for step in range(steps + 1):
            sigma_bar, dsigma = sigma_bars[step], sigma_bars[step] - sigma_bars[step + 1]
            # absorb: the network ignores the noise level, so a sample that the last step left
            # unchanged keeps its output: only the others are fed (MDLM's cached sampler)
            todo = (fed != x_t).any(-1) | (graph == 'uniform')  # (B,)
            if todo.any():
                with autocast(device):
                    out[todo] = model(x_t[todo], sigma_bar.expand(int(todo.sum())))
            fed = x_t
            log_score = out / temperature  # 1 is the exact model; below, sharper, less varied
            if graph == 'absorb':  # temper p(x_0 | x_t) alone, not the rate of unmasking
                log_score = log_score.log_softmax(-1) - torch.log(torch.expm1(sigma_bar))
            probs = tweedie_probs(log_score.exp(), x_t[:, 1:], dsigma, graph)
            if step == steps and graph == 'absorb':
                probs = probs[..., :N]  # no mask survives the final step
            # a draw in proportion to probs, then the given characters back (SEDD's conditioning)
            drawn = (probs.clamp(min=0) / torch.empty_like(probs).exponential_()).argmax(-1)
            if order != 'random':  # the schedule's count of masks left, the rest revealed in order
                left = (free[:, 1:].sum(-1) * masked_after[step]).round()  # (B,)
                drawn = reveal(out / temperature, x_t[:, 1:], left, order, confidence_noise)
            x_t = torch.where(free, torch.cat([kept[:, :1], drawn], 1), kept)
            x[:, start:start + block] = x_t
            if callback:
                callback(step, x[:, 1:])
    return x[:, 1:]

# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    return plumbing.check_args(plumbing.parser(__doc__, defaults, SHIPPED).parse_args(argv))

def main():
    args = parse_args()
    if args.train:
        return train(args)
    path = args.ckpt or default_checkpoint(args.out)
    model, ckpt = load_checkpoint(path)
    model = model.to(args.device).eval()
    plumbing.describe(path, ckpt)
    if args.export:
        return plumbing.export(args.export, ckpt, KIND)
    if args.eval:
        return evaluate(model, args)
    length, given = plumbing.given(args, ckpt['vocab'], model.config.block_size)  # diffusion: masks
    order = plumbing.sampling_order(args, model.config.graph, defaults['order'])  # diffusion
    plumbing.check_sampling_memory(args.num_samples, length, model.config)
    torch.manual_seed(args.seed)
    x, passes, flops, seconds = measure(model, lambda: generate(
        model, args.num_samples, length, args.steps, args.temperature, args.device, given=given,
        order=order, confidence_noise=args.confidence_noise))
    for i, row in enumerate(x.tolist()):
        print(('' if i == 0 else '\n' + '-' * 40 + '\n') + ''.join(ckpt['vocab'][t] for t in row))
    print(f'{args.num_samples} x {length} characters in {seconds:.2f} s, {passes} forward passes, '
          f'about {flops / 1e9:.3g} GFLOPs', file=sys.stderr)

if __name__ == '__main__':
    main()
