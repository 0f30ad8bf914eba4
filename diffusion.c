/* diffusion.c: diffusion.py's absorbing model sampled in one file of C11 with libc and libm
alone, the same network and Tweedie steps, from `python diffusion.py --export FILE.safetensors`.
    cc -O3 -o diffusion diffusion.c -lm   build (-fopenmp: every core; -march=native: wider vectors)
    ./diffusion                           sample from weights/diffusion.safetensors
    ./diffusion --infill "ROMEO:____________JULIET:"   fill in the _, both sides in view */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// the defaults of `python diffusion.py` (test_smoke.py checks them); length: a context less one
#define STEPS 128
#define TEMPERATURE 1.0
#define ORDER "confidence"
#define CONFIDENCE_NOISE 2.0
#define SEED 1337
#define PATH "weights/diffusion.safetensors"
#define T_EPS 1e-5  // t runs from 1 - T_EPS to T_EPS, as in diffusion.py
#define FORMAT 2    // plumbing.FORMAT: the output at position i scores character i + 1

#ifdef _OPENMP  // with -fopenmp the loops marked so share their iterations out over every core
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define PARALLEL_FOR
#endif

// errors: one line on stderr, as plumbing.die; exit 2 for a bad flag, 1 for a file not trusted
static const char *path = PATH;
static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt), fputs("error: ", stderr), vfprintf(stderr, fmt, ap), va_end(ap);
    if (code == 1) fprintf(stderr, "; export it again: python diffusion.py --export %s", path);
    fputc('\n', stderr), exit(code);
}

static void *alloc(size_t n) {  // zeroed
    void *p = calloc(n ? n : 1, 1);
    return p ? p : (fputs("error: out of memory\n", stderr), exit(1), p);
}

// random numbers (xorshift64*): the same distribution of samples as Python's, not the same ones
static uint64_t rng;
static double uniform(void) {  // in (0, 1)
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return ((double)((rng * 0x2545F4914F6CDD1DULL) >> 11) + 0.5) / 9007199254740992.0;
}

// a draw in proportion to w[0..n-1], negative weights (and NaN) as 0, as Python's clamp(min=0)
static int draw(const double *w, int n) {
    double total = 0, u = uniform();
    int last = 0;
    for (int i = 0; i < n; i++) if (w[i] > 0) total += w[i], last = i;
    for (int i = 0; i < n; i++) if (w[i] > 0 && (u -= w[i] / total) < 0) return i;
    return last;
}

// -----------------------------------------------------------------------------
// JSON, enough of it for a safetensors header. Each function takes the text at a value and
// returns the text after it, or NULL where it is malformed; the text ends with a NUL.
static const char *ws(const char *p) { return p + strspn(p, " \t\n\r"); }

// a string: how many bytes into *len, and up to cap - 1 of them unescaped into out (or none)
static const char *json_string(const char *p, char *out, size_t cap, size_t *len) {
    static const char escapes[] = "\"\\/bfnrt", *e;
    unsigned u;
    int k = 0;
    if (*p++ != '"') return NULL;
    for (*len = 0; *p != '"'; ++*len) {
        char c = *p++;
        if ((unsigned char)c < 0x20) return NULL;  // a control character, or the end of the text
        if (c == '\\' && *p == 'u') {  // \u00XX: ASCII only, as json.dumps writes UTF-8 as is
            if (sscanf(p + 1, "%4x%n", &u, &k) < 1 || k != 4 || u >= 0x80) return NULL;
            c = (char)u, p += 5;
        } else if (c == '\\') {
            if (!*p || !(e = strchr(escapes, *p++))) return NULL;
            c = "\"\\/\b\f\n\r\t"[e - escapes];
        }
        if (out && *len + 1 < cap) out[*len] = c;
    }
    if (out && cap) out[*len < cap ? *len : cap - 1] = 0;
    return p + 1;
}

static const char *json_value(const char *p, int depth) {
    size_t len;
    char *end;
    if (*(p = ws(p)) == '"') return json_string(p, NULL, 0, &len);
    if ((*p == '{' || *p == '[') && depth < 16) {  // deeper than any header: a bounded stack
        char close = *p == '{' ? '}' : ']';
        if (*(p = ws(p + 1)) == close) return p + 1;
        for (;; p = ws(p + 1)) {
            if (close == '}' && (!(p = json_string(p, NULL, 0, &len)) || *(p = ws(p)) != ':'))
                return NULL;
            if (!(p = json_value(p + (close == '}'), depth + 1))) return NULL;
            if (*(p = ws(p)) == close) return p + 1;
            if (*p != ',') return NULL;
        }
    }
    strtod(p, &end);  // a number, as strtod reads it (a little more than JSON's; no true or null)
    return end > p ? end : NULL;
}

static const char *json_get(const char *p, const char *key) {  // in an object checked already
    char name[128];
    size_t len;
    if (!p || *(p = ws(p)) != '{') return NULL;
    for (p = ws(p + 1); *p == '"'; p = ws(p + 1)) {
        p = ws(ws(json_string(p, name, sizeof name, &len)) + 1);
        if (len == strlen(key) && !strcmp(name, key)) return p;
        if (*(p = ws(json_value(p, 0))) != ',') break;
    }
    return NULL;
}
static long long json_int(const char *p, long long max) {  // a whole number 0..max, else -1
    char *end = NULL;
    double v = p ? strtod(p = ws(p), &end) : -1;
    return p && end > p && v >= 0 && v <= max && v == floor(v) ? (long long)v : -1;
}
static int json_ints(const char *p, long long *out, int most, long long max) {  // how many
    int n = 0;
    for (p = p && *p == '[' ? ws(p + 1) : NULL; p && *p != ']'; p = ws(p + (*p == ',')))
        if (n == most || (out[n++] = json_int(p, max)) < 0 || !(p = ws(json_value(p, 0))))
            return -1;
    return p ? n : -1;
}
static char *json_text(const char *p) {  // the string at p, unescaped into new memory, or NULL
    size_t n;
    char *s = p && json_string(p, NULL, 0, &n) ? alloc(n + 1) : NULL;
    return s && json_string(p, s, n + 1, &n) ? s : NULL;
}

// -----------------------------------------------------------------------------
// the model: diffusion.py's Config and Transformer, its weights read from a safetensors file.
// A matrix (out, in) is kept as matmul reads it: transposed, in panels of W columns (below).
#define R 4   // matmul's tile: R rows of x
#define W 24  // by W columns of w
typedef struct { int vocab_size, n_layer, n_head, n_embd, block_size; } Config;
// a Block: ln_1, ln_2 (C); c_attn (C, 3C), attn_proj (C, C), c_fc (C, 4C), mlp_proj (4C, C)
typedef struct { float *ln_1, *c_attn, *attn_proj, *ln_2, *c_fc, *mlp_proj; } Layer;
typedef struct {
    Config config;
    float *wte, *ln_f, *head;  // (N + 1, C), the mask's embedding last; (C); (C, N)
    Layer *layers;             // (n_layer)
    char (*vocab)[5];          // (N) characters, each in UTF-8
    double params;             // as PyTorch counts them, for the FLOPs
} Model;

static char *header;  // of the file being read: its JSON header, NUL-terminated, and its data
static const unsigned char *data, *data_end;  // and the tensors' data

// the tensor name, float32 of shape (rows, cols) (a vector: rows 0), checked against the file
static float *tensor(Model *m, const char *name, int rows, int cols, int panels) {
    const char *t = json_get(header, name), *dtype = json_text(json_get(t, "dtype"));
    long long shape[2], at[2], n = (long long)(rows ? rows : 1) * cols;
    if (!t || *t != '{') die(1, "%s has no tensor %s", path, name);
    if (!dtype || strcmp(dtype, "F32")) die(1, "%s: tensor %s is not float32 (F32)", path, name);
    int dims = json_ints(json_get(t, "shape"), shape, 2, 1LL << 40);
    if (dims != 1 + !!rows || shape[0] != (rows ? rows : cols) || (rows && shape[1] != cols))
        die(1, "%s: tensor %s is not of shape (%d, %d)", path, name, rows, cols);
    if (json_ints(json_get(t, "data_offsets"), at, 2, 1LL << 50) != 2 || at[0] > at[1]
            || at[1] > data_end - data || at[1] - at[0] != 4 * n)
        die(1, "%s: tensor %s's data offsets do not fit its shape and the file", path, name);
    float *w = alloc(sizeof(float) * (panels ? (rows + W - 1) / W * W * cols : n));
    for (long long i = 0; i < n; i++) {  // little-endian bytes, whatever this machine's order
        const unsigned char *b = data + at[0] + 4 * i;
        uint32_t u = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
        long long o = i / cols, in = i % cols;  // element (o, in) at (in, o % W) of panel o / W
        memcpy(&w[panels ? (o / W * cols + in) * W + o % W : i], &u, 4);
    }
    return m->params += (double)n, w;
}

// the model in file: 8 bytes of little-endian header size, the JSON header, the tensors' data
static void load(Model *m, const char *file) {
    FILE *f = fopen(file, "rb");
    long size = -1;
    unsigned long long n = 0;
    if (!f) die(1, "cannot open %s", file);
    // the size, and a first byte: a folder, which some systems open, has none
    if (fseek(f, 0, SEEK_END) || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) || fgetc(f) == EOF
            || fseek(f, 0, SEEK_SET)) size = -1;
    unsigned char *bytes = alloc(size > 0 ? (size_t)size : 1);
    if (size < 0 || fread(bytes, 1, (size_t)size, f) != (size_t)size) die(1, "can't read %s", file);
    for (int i = 7; i >= 0 && size >= 8; i--) n = n << 8 | bytes[i];
    if (size < 8 || n > (unsigned long long)size - 8) die(1, "%s is shorter than its header", file);
    memcpy(header = alloc(n + 1), bytes + 8, n);
    data = bytes + 8 + n, data_end = bytes + size;
    const char *end = json_value(header, 0), *keys[] = {"kind", "format", "config", "vocab"};
    if (!end || ws(end) != header + n || *ws(header) != '{')
        die(1, "%s: its header is not a JSON object", file);
    char *meta[4], *graph;  // the metadata's strings; the config in ranges that keep sizes in int
    for (int i = 0; i < 4; i++) meta[i] = json_text(json_get(json_get(header, "__metadata__"),
                                                             keys[i]));
    if (!meta[0] || !meta[1] || !meta[2] || !meta[3] || strcmp(meta[0], "diffusion"))
        die(1, "%s is not a diffusion model exported by diffusion.py", file);
    if (json_int(meta[1], 99) != FORMAT) die(1, "%s is of another format than %d", file, FORMAT);
    if (!(end = json_value(meta[2], 0)) || *ws(end) || *ws(meta[2]) != '{')
        die(1, "%s: its config is not JSON", file);
    if (!(graph = json_text(json_get(meta[2], "graph"))) || strcmp(graph, "absorb"))
        die(1, "%s: diffusion.c samples the absorbing graph only; use python diffusion.py", file);
    const char *names[] = {"vocab_size", "n_layer", "n_head", "n_embd", "block_size"};
    long long most[] = {65535, 256, 4096, 8192, 16384}, v[5];
    for (int i = 0; i < 5; i++)
        if ((v[i] = json_int(json_get(meta[2], names[i]), most[i])) < 1 + (i == 4))
            die(1, "%s: config %s is missing or out of range", file, names[i]);
    Config c = m->config = (Config){(int)v[0], (int)v[1], (int)v[2], (int)v[3], (int)v[4]};
    if (c.n_embd % (2 * c.n_head)) die(1, "%s: config n_embd is not a multiple of 2 n_head", file);
    size_t len = strlen(meta[3]), k = 0, b;  // b: the bytes of a character, continuation bytes too
    m->vocab = alloc(sizeof *m->vocab * c.vocab_size);  // N characters of UTF-8, one per token id
    for (int i = 0; i < c.vocab_size; i++, k += b) {
        size_t u = (unsigned char)meta[3][k], bad = len + 1;  // the lead byte gives the length
        b = u < 0x80 ? 1 : u >> 5 == 6 ? 2 : u >> 4 == 14 ? 3 : u >> 3 == 30 ? 4 : bad;
        for (size_t j = 1; j < b && k + j < len; j++) if ((meta[3][k + j] & 0xC0) != 0x80) b = bad;
        if (k + b > len) die(1, "%s: its vocab is not vocab_size characters of UTF-8", file);
        memcpy(m->vocab[i], meta[3] + k, b);
    }
    if (k != len) die(1, "%s: its vocab is longer than vocab_size", file);
    int C = c.n_embd, N = c.vocab_size;
    char name[64];
    m->wte = tensor(m, "wte.weight", N + 1, C, 0);
    m->layers = alloc(sizeof(Layer) * c.n_layer);
#define WEIGHT(field, what, rows, cols) snprintf(name, sizeof name, "blocks.%d.%s.weight", l, \
    what), m->layers[l].field = tensor(m, name, rows, cols, rows > 0)
    for (int l = 0; l < c.n_layer; l++)
        WEIGHT(ln_1, "ln_1", 0, C), WEIGHT(c_attn, "attn.c_attn", 3 * C, C),
        WEIGHT(attn_proj, "attn.c_proj", C, C), WEIGHT(ln_2, "ln_2", 0, C),
        WEIGHT(c_fc, "mlp.c_fc", 4 * C, C), WEIGHT(mlp_proj, "mlp.c_proj", C, 4 * C);
    m->ln_f = tensor(m, "ln_f.weight", 0, C, 0), m->head = tensor(m, "head.weight", N, C, 1);
    fclose(f);
}

// -----------------------------------------------------------------------------
// the forward pass, as Transformer.forward
// out (n, d) = x (n, k) @ w (k, d) (out += with add), rows of x sx floats apart, of out so; w in
// panels (d / W, k, W), zeros past d. A tile of R rows by W columns sums in registers over all of
// k, the inner loop a row of the panel, contiguous: vector instructions. The cores share the tiles.
static void matmul(float *out, int so, float *x, int sx, float *w, int n, int d, int k, int add) {
    int rows = (n + R - 1) / R, tiles = rows * ((d + W - 1) / W);
    PARALLEL_FOR
    for (int tile = 0; tile < tiles; tile++) {
        int i0 = tile % rows * R, j0 = tile / rows * W, width = d - j0 < W ? d - j0 : W;
        float *xr[R], *panel = w + (size_t)j0 * k;
        float acc[R][W] = {{0}};
        for (int r = 0; r < R; r++) xr[r] = x + (size_t)(i0 + r < n ? i0 + r : n - 1) * sx;
        for (int p = 0; p < k; p++)
            for (int r = 0; r < R; r++)
                for (int c = 0; c < W; c++) acc[r][c] += xr[r][p] * panel[p * W + c];
        for (int r = 0; r < R && i0 + r < n; r++)
            for (int c = 0, o = (i0 + r) * so + j0; c < width; c++, o++)
                out[o] = acc[r][c] + (add ? out[o] : 0);
    }
}

// e^x, x <= 0 (softmax), and erf (GELU) to 5e-7, in arithmetic the compiler vectorises as it cannot
// libm's: 2^n (n = round(x / ln 2), the low bits of x / ln 2 + 1.5 * 2^23) times a polynomial for
// e^(x - n ln 2); erf as Abramowitz and Stegun's 7.1.26
static float exp_neg(float x) {
    float m = x * 1.44269504f + 12582912.0f, n = m - 12582912.0f, r = x - n * 0.693147181f, e;
    uint32_t k;
    memcpy(&k, &m, 4), k = k - 0x4B400000u + 127, k = (k > 254 ? 0 : k) << 23;  // 2^n, or 0
    memcpy(&e, &k, 4);
    return e * (1 + r * (1 + r * (0.5f + r * (1 / 6.0f + r * (1 / 24.0f + r * (1 / 120.0f
                                                                                + r / 720))))));
}
static float erf_(float x) {
    float a = fabsf(x), t = 1 / (1 + 0.3275911f * a), y = 1 - t * (0.254829592f + t * (-0.284496736f
        + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)))) * exp_neg(-a * a);
    return copysignf(y, x);
}

// LayerNorm without bias (eps 1e-5): each row of x (T, C) to mean 0 and variance 1, times w
static void layer_norm(float *out, const float *x, const float *w, int T, int C) {
    for (int t = 0; t < T; t++) {
        const float *r = x + (size_t)t * C;
        double mean = 0, var = 0, scale;
        for (int i = 0; i < C; i++) mean += r[i];
        for (int i = 0; i < C; i++) var += (r[i] - mean / C) * (r[i] - mean / C);
        scale = 1 / sqrt(var / C + 1e-5), mean /= C;
        for (int i = 0; i < C; i++) out[(size_t)t * C + i] = (float)((r[i] - mean) * scale) * w[i];
    }
}

// rotary position embeddings: in each head of q and k, rotate the pair of channels (j, j + hs/2)
// by the angle t / 10000^(2j / hs) at position t, so that attention sees how far apart two are
static void rotary(float *qkv, int T, int C, int n_head) {
    int hs = C / n_head;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < hs / 2; j++) {
            float angle = (float)t * powf(10000.0f, -(float)(2 * j) / hs);
            float cos = cosf(angle), sin = sinf(angle);
            for (int h = 0; h < 2 * n_head; h++) {  // the heads of q, then those of k
                float *x = qkv + (size_t)t * 3 * C + h * hs, x1 = x[j], x2 = x[j + hs / 2];
                x[j] = x1 * cos - x2 * sin, x[j + hs / 2] = x1 * sin + x2 * cos;
            }
        }
}

// the activations of T tokens: x, h, y (T, C); qkv (T, 3C); k, v of a head, as panels; att (T, T)
typedef struct { float *x, *h, *y, *qkv, *k, *v, *att, *fc; } State;  // fc (T, 4C)

// full attention: every position sees the whole sequence (diffusion.py's CAUSAL = False)
static void attention(State *s, int T, int C, int n_head) {
    int hs = C / n_head;
    for (int h = 0; h < n_head; h++) {
        float *q = s->qkv + h * hs;  // rows 3C apart, k C and v 2C after q
        for (int t = 0; t < T; t++)  // k^T (hs, T) and v (T, hs), as panels for matmul
            for (int i = 0; i < hs; i++) {
                s->k[((size_t)t / W * hs + i) * W + t % W] = q[(size_t)t * 3 * C + C + i];
                s->v[((size_t)i / W * T + t) * W + i % W] = q[(size_t)t * 3 * C + 2 * C + i];
            }
        matmul(s->att, T, q, 3 * C, s->k, T, T, hs, 0);  // (T, T): q k^T
        PARALLEL_FOR
        for (int t = 0; t < T; t++) {  // softmax(q k^T / sqrt(hs)), row by row
            float *a = s->att + (size_t)t * T, max = a[0], sum = 0, scale = 1 / sqrtf((float)hs);
            for (int u = 0; u < T; u++) max = a[u] > max ? a[u] : max;
            for (int u = 0; u < T; u++) a[u] = exp_neg((a[u] - max) * scale);
            for (int u = 0; u < T; u++) sum += a[u];
            for (int u = 0; u < T; u++) a[u] *= 1 / sum;
        }
        matmul(s->y + h * hs, C, s->att, T, s->v, T, hs, T, 0);  // (T, hs): att v
    }
}

// tokens (T) to log p(x_0 = y | x_t) at temperature temp (T - 1, N): output i scores token i + 1
static void forward(const Model *m, State *s, const int *tokens, int T, float *out, double temp) {
    int C = m->config.n_embd, N = m->config.vocab_size;
    for (int t = 0; t < T; t++) memcpy(s->x + (size_t)t * C, m->wte + (size_t)tokens[t] * C, 4 * C);
    for (int l = 0; l < m->config.n_layer; l++) {
        const Layer *L = &m->layers[l];
        layer_norm(s->h, s->x, L->ln_1, T, C);  // x = x + attn(ln_1(x))
        matmul(s->qkv, 3 * C, s->h, C, L->c_attn, T, 3 * C, C, 0);
        rotary(s->qkv, T, C, m->config.n_head);
        attention(s, T, C, m->config.n_head);
        matmul(s->x, C, s->y, C, L->attn_proj, T, C, C, 1);
        layer_norm(s->h, s->x, L->ln_2, T, C);  // x = x + mlp(ln_2(x)), GELU of erf, not tanh
        matmul(s->fc, 4 * C, s->h, C, L->c_fc, T, 4 * C, C, 0);
        PARALLEL_FOR
        for (int i = 0; i < T * 4 * C; i++) s->fc[i] *= 0.5f * (1 + erf_(s->fc[i] * 0.70710678f));
        matmul(s->x, C, s->fc, 4 * C, L->mlp_proj, T, C, 4 * C, 1);
    }
    layer_norm(s->h, s->x, m->ln_f, T, C);
    matmul(out, N, s->h, C, m->head, T - 1, N, C, 0);
    for (int i = 0; i < T - 1; i++) {  // log_softmax(logits / temperature), row by row
        float *r = out + (size_t)i * N, max = -INFINITY;
        double sum = 0;
        for (int y = 0; y < N; y++) r[y] = (float)(r[y] / temp), max = fmaxf(max, r[y]);
        for (int y = 0; y < N; y++) sum += exp(r[y] - max);
        for (int y = 0; y < N; y++) r[y] = (float)(r[y] - max - log(sum));
    }
}

// -----------------------------------------------------------------------------
// sampling, as diffusion.py's generate
enum { RANDOM, CONFIDENCE, LEFT_TO_RIGHT };
static int steps = STEPS, order;
static double temperature = TEMPERATURE, confidence_noise = CONFIDENCE_NOISE;

// the Tweedie step of the absorbing graph at a mask, from logp = log p(x_0 = y | x_t): with the
// score s_y = p(y) / (e^sigma_bar - 1), it becomes y with probability (e^dsigma - 1) s_y, or stays
static void tweedie_probs(double *probs, float *logp, int N, double sigma_bar, double dsigma) {
    probs[N] = 1;
    for (int y = 0; y < N; y++)
        probs[N] -= probs[y] = expm1(dsigma) * exp(logp[y]) / expm1(sigma_bar);
}

// denoise x (T), the start token then given characters and masks (id N); returns the passes
static int generate(const Model *m, State *s, int *x, int T) {
    int N = m->config.vocab_size, *drawn = alloc(sizeof(int) * T), fed = 0, passes = 0, F = 0;
    float *logp = alloc(sizeof(float) * (T - 1) * N);  // (T - 1, N): position i scores i + 1
    double *probs = alloc(sizeof(double) * (N + 1)), *priority = alloc(sizeof(double) * T);
    for (int i = 1; i < T; i++) F += x[i] == N;
    for (int step = 0; step <= steps; step++) {
        // ts = linspace(1 - T_EPS, T_EPS, steps + 1), then 0; sigma_bar = -log(1 - t)
        double dt = (2 * T_EPS - 1) / steps, t = 1 - T_EPS + step * dt, sigma_bar = -log1p(-t);
        double next = step < steps ? t + dt : 0, dsigma = sigma_bar + log1p(-next);
        int masked = 0;
        // the network ignores the noise level: no pass after a step that changed nothing (MDLM)
        if (!fed) forward(m, s, x, T, logp, temperature);
        passes += !fed, fed = 1;
        for (int i = 1; i < T; i++) {
            float *lp = logp + (size_t)(i - 1) * N;
            if (x[i] != N) continue;  // characters stay, the given ones too
            if (order == RANDOM) {  // no mask survives the last step
                tweedie_probs(probs, lp, N, sigma_bar, dsigma);
                if ((drawn[i] = draw(probs, N + (step < steps))) != N) x[i] = drawn[i], fed = 0;
                continue;
            }
            for (int y = 0; y < N; y++) probs[y] = exp(lp[y]);
            drawn[i] = draw(probs, N), masked++;  // confidence, left-to-right: a draw, kept by
            priority[i] = order == LEFT_TO_RIGHT ? -i  // priority: the leftmost first, or the
                          : lp[drawn[i]] - confidence_noise * log(-log(uniform()));  // likeliest
        }
        // round(F ts[step + 1] / ts[0]) of the F free positions stay masked, the rest take draws
        for (int keep = (int)nearbyint(F * next / (1 - T_EPS)); masked > keep; masked--) {
            int best = 0;
            for (int i = 1; i < T; i++)
                if (x[i] == N && (!best || priority[i] > priority[best])) best = i;
            x[best] = drawn[best], fed = 0;
        }
    }
    return free(drawn), free(logp), free(probs), free(priority), passes;
}

// -----------------------------------------------------------------------------
// the command line
static double number(const char *flag, const char *text, double lo, double hi, int whole) {
    char *end;
    double v = strtod(text, &end);
    if (end == text || *end || !(v >= lo && v <= hi) || (whole && v != floor(v)))
        die(2, "%s %s: give a%s number from %g to %g", flag, text, whole ? " whole" : "", lo, hi);
    return v;
}

// the token ids of text (at most `most`): its UTF-8 characters in the vocabulary, '_' the mask N
static int encode(const Model *m, const char *flag, const char *text, int *ids, int most) {
    int n = 0, N = m->config.vocab_size;
    for (const char *p = text; *p; n++) {
        int k = 1, id = *p == '_' ? N : -1;
        char c[6] = {0};
        while (k < 5 && (p[k] & 0xC0) == 0x80) k++;  // a character of UTF-8: its first byte and
        memcpy(c, p, k);                              // those that continue it
        for (int y = 0; y < N && id < 0; y++) id = strcmp(c, m->vocab[y]) ? -1 : y;
        if (n == most)
            die(2, "%s: the context after the start token holds %d characters", flag, most);
        if (id < 0) die(2, "%s has a character the model does not know: '%s'", flag, c);
        ids[n] = id, p += k;
    }
    return n;
}
static const char *usage = "usage: ./diffusion [FILE] [flags]: sample from FILE (default: "
    PATH ")\n  --steps N (default: %d)  --num-samples N (default: 1)  --seed N (default: %d)\n"
    "  --length N: characters, at most the context after the start token (default: all of it)\n"
    "  --temperature T (default: %g)  --infill TEXT: each _ generated, the others kept\n"
    "  --order random|confidence|left-to-right (default: %s)  --confidence-noise X (default: %g)\n"
    "  --logprobs TEXT: print log p(character i + 1) at each position i of TEXT, then exit\n";

int main(int argc, char **argv) {
    int samples = 1, length = 0, paths = 0;
    double seed = SEED, seconds = 0, passes = 0;
    const char *orders[] = {"random", "confidence", "left-to-right"}, *how = ORDER, *infill = NULL,
               *logprobs = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return printf(usage, STEPS, SEED, TEMPERATURE, ORDER, CONFIDENCE_NOISE), 0;
        if (strncmp(a, "--", 2) && paths++) die(2, "give one file, not %s and %s", path, a);
        if (strncmp(a, "--", 2)) path = a, i--;
        else if (!strcmp(a, "--steps")) steps = (int)number(a, v, 1, 1e6, 1);
        else if (!strcmp(a, "--num-samples")) samples = (int)number(a, v, 1, 1e6, 1);
        else if (!strcmp(a, "--length")) length = (int)number(a, v, 1, 1e6, 1);
        else if (!strcmp(a, "--temperature")) temperature = number(a, v, 1e-3, 1e3, 0);
        else if (!strcmp(a, "--seed")) seed = number(a, v, 0, 9.2e18, 1);
        else if (!strcmp(a, "--confidence-noise")) confidence_noise = number(a, v, 0, 1e3, 0);
        else if (!strcmp(a, "--order") || !strcmp(a, "--infill") || !strcmp(a, "--logprobs"))
            *(a[2] == 'o' ? &how : a[2] == 'i' ? &infill : &logprobs) = v;
        else die(2, "unknown flag %s; ./diffusion --help lists them", a);
        i++;
    }
    while (order < 3 && strcmp(how, orders[order])) order++;
    if (order == 3) die(2, "unknown --order %s; use random, confidence or left-to-right", how);
    if (infill && length) die(2, "--infill gives the whole text and its length; drop --length");
    if (infill && !strchr(infill, '_')) die(2, "--infill has no _ to mark what to generate");
    Model m = {0};
    load(&m, path);
    int N = m.config.vocab_size, C = m.config.n_embd, most = m.config.block_size - 1;
    if (length > most) die(2, "--length %d: the context after the start token is %d", length, most);
    int *given = alloc(sizeof(int) * (most + 1));  // given[0] = 0: token 0 ('\n' in Shakespeare)
    if (infill || logprobs)                        // starts every sample, as the GPT's
        length = encode(&m, infill ? "--infill" : "--logprobs", infill ? infill : logprobs,
                        given + 1, most);
    else
        for (int i = 1; i <= (length = length ? length : most); i++) given[i] = N;
    int T = length + 1, hs = C / m.config.n_head, *x = alloc(sizeof(int) * T);
    size_t TC = (size_t)T * C, TW = (size_t)(T + W - 1) / W * W, hsW = (size_t)(hs + W - 1) / W * W;
    State s = {alloc(4 * TC), alloc(4 * TC), alloc(4 * TC), alloc(12 * TC), alloc(4 * TW * hs),
               alloc(4 * hsW * T), alloc(4 * (size_t)T * T), alloc(16 * TC)};
    float *out = alloc(sizeof(float) * (T - 1) * N);
    if (logprobs) {  // for the tests: Transformer.forward's output + log(e^sigma_bar - 1)
        forward(&m, &s, given, T, out, 1.0);
        for (int i = 0; i < (T - 1) * N; i++) printf("%.6f%c", out[i], (i + 1) % N ? ' ' : '\n');
        return 0;
    }
    rng = ((uint64_t)seed ^ 0x9E3779B97F4A7C15ULL) * 0xBF58476D1CE4E5B9ULL | 1;
    for (int b = 0; b < samples; b++) {  // one at a time, each pass counted
        struct timespec t0, t1;
        memcpy(x, given, sizeof(int) * T), timespec_get(&t0, TIME_UTC);
        passes += generate(&m, &s, x, T), timespec_get(&t1, TIME_UTC);
        seconds += (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        printf("%s", b ? "\n----------------------------------------\n" : "");
        for (int i = 1; i < T; i++) fputs(m.vocab[x[i]], stdout);
        putchar('\n');
    }
    // diffusion.py's timing line, FLOPs as plumbing.measure counts them: 2 per weight and token
    fprintf(stderr, "%d x %d characters in %.2f s, %.0f forward passes, about %.3g GFLOPs\n",
            samples, length, seconds, passes, 2.0 * m.params * T * passes / 1e9);
    return 0;
}
