"""The fixed parts of the C program :mod:`.export_c` writes: ``unet.h``, the kernels (integer
convolution, requantization, pooling, upsampling, conversions between codes and float values)
and ``main``. :mod:`.export_c` fills in the network (its constant arrays and the dataflow) and
the header comment. The C follows ``docs/integer-format.md`` operation for operation."""

from __future__ import annotations

HEADER_H = """\
/* unet.h: the data structures of the exported integer U-Net (see unet.c for the program). */
#ifndef UNET_H
#define UNET_H

#include <stddef.h>
#include <stdint.h>

/* How a tensor's elements are stored: float32 values, or integer codes. */
enum unet_storage { F32, I8, I16, I32, I64 };

/* What a layer hands to one consumer. */
enum unet_result {
    FLOAT_VALUES, /* float32 values y = max(z, 0) * alpha + beta (z without BatchNorm: head) */
    REQUANTIZED,  /* integer layers: clamp(rhe(multiplier * acc + offset, shift), low, high) */
    QUANTIZED     /* float layers: the consumer's codes of y (see unet_format) */
};

/* Activation codes: value = code * step, lo <= code <= hi. A float value y becomes
   clamp(y * scale, lo, hi) (fixed_point: scale = 2**frac_bits) or clamp(y / scale, lo, hi)
   (scale = step), rounded half to even, in float32. */
typedef struct {
    int fixed_point;
    float scale;
    float step;
    int lo, hi;
} unet_format;

typedef struct {
    const char *consumer;
    enum unet_result kind; /* its storage type: see run_network in unet.c */
    /* REQUANTIZED: int64 per output channel; shift is the format's shift minus extra bits */
    const int64_t *multiplier, *offset, *low, *high;
    int shift;
    /* QUANTIZED: the consumer's input format */
    const unet_format *format;
} unet_output;

/* One 3x3 convolution (stride 1, zero padding 1) with its ReLU and folded BatchNorm. */
typedef struct {
    const char *name;
    int integer;        /* 1: int8 codes in, packed weight codes, int32 accumulators */
    int in_channels, out_channels;
    int relu_batchnorm; /* 0 only for the head */
    const unet_format *input;      /* the input codes' format; NULL: float input */
    int weight_bits;               /* integer layers: bits per packed code */
    const uint8_t *weight_codes;   /* integer layers: packed codes, order (out, ky, kx, in) */
    const float *weight;           /* float layers: float32, order (out, in, ky, kx) */
    const double *accumulator_scale; /* integer layers with a float result: one acc unit */
    const float *bias, *alpha, *beta; /* layers with a float result (NULL otherwise) */
    int output_count;
    unet_output outputs[2];
} unet_layer;

#define UNET_DEPTH %(depth)d
#define UNET_IN_CHANNELS %(in_channels)d
#define UNET_UPSAMPLE_EXTRA_BITS %(extra_bits)d
#define UNET_OUT_CHANNELS %(out_channels)d
%(output_macros)s
extern const size_t unet_weight_bytes; /* bytes of every constant array in weights.c */

/* The library entry (build without the command line: cc -DUNET_NO_MAIN ...): the mask of one
   preprocessed slice, height x width float32 values row-major (channels last), into mask,
   height x width bytes: %(mask_values)s.
   Returns 0; -1 when memory runs out, -2 for a size below 1 or a value that is not a finite
   number (mask is then untouched). */
int unet_segment(const float *slice, int height, int width, unsigned char *mask);
%(externs)s

#endif
"""

KERNELS = r"""
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unet.h"

/* ---- heap buffers: all go through here, so that the peak can be reported ---- */

static size_t live_bytes, peak_bytes;

static void *buffer_alloc(size_t bytes)
{
    void *memory = malloc(bytes > 0 ? bytes : 1);
    if (memory != NULL) {
        live_bytes += bytes;
        if (live_bytes > peak_bytes)
            peak_bytes = live_bytes;
    }
    return memory;
}

static void buffer_free(void *memory, size_t bytes)
{
    if (memory != NULL) {
        free(memory);
        live_bytes -= bytes;
    }
}

/* An activation tensor, (height, width, channels) in C order. */
typedef struct {
    int height, width, channels;
    enum unet_storage storage;
    void *data;
} tensor;

static const size_t STORAGE_BYTES[] = {4, 1, 2, 4, 8}; /* F32, I8, I16, I32, I64 */

static size_t tensor_bytes(const tensor *t)
{
    return (size_t)t->height * t->width * t->channels * STORAGE_BYTES[t->storage];
}

static int tensor_new(tensor *t, int height, int width, int channels, enum unet_storage storage)
{
    t->height = height;
    t->width = width;
    t->channels = channels;
    t->storage = storage;
    if ((size_t)height * width > SIZE_MAX / 8 / (size_t)channels)
        return 0;
    t->data = buffer_alloc(tensor_bytes(t));
    return t->data != NULL;
}

static void tensor_free(tensor *t)
{
    buffer_free(t->data, tensor_bytes(t));
    t->data = NULL;
}

static int64_t code_at(const tensor *t, size_t i)
{
    switch (t->storage) {
    case I8: return ((const int8_t *)t->data)[i];
    case I16: return ((const int16_t *)t->data)[i];
    case I32: return ((const int32_t *)t->data)[i];
    default: return ((const int64_t *)t->data)[i];
    }
}

static void set_code(tensor *t, size_t i, int64_t code)
{
    switch (t->storage) {
    case I8: ((int8_t *)t->data)[i] = (int8_t)code; break;
    case I16: ((int16_t *)t->data)[i] = (int16_t)code; break;
    case I32: ((int32_t *)t->data)[i] = (int32_t)code; break;
    default: ((int64_t *)t->data)[i] = code; break;
    }
}

/* ---- arithmetic (docs/integer-format.md) ---- */

/* floor(v / 2**s), s > 0, without relying on >> of negative numbers */
static int64_t floor_shift(int64_t v, int s)
{
    return v >= 0 ? v >> s : -((-v - 1) >> s) - 1;
}

/* rhe(v, s): v / 2**s rounded to the nearest integer, ties to even */
static int64_t round_shift(int64_t v, int s)
{
    if (s <= 0)
        return v * ((int64_t)1 << -s);
    return floor_shift(v + ((int64_t)1 << (s - 1)) - 1 + (floor_shift(v, s) & 1), s);
}

static int64_t clamp(int64_t v, int64_t low, int64_t high)
{
    return v < low ? low : v > high ? high : v;
}

/* The codes of a float value: scaled, clamped, rounded half to even (rintf in the default
   rounding mode), all in float32 as the quantizer computes them. */
static int64_t quantize_value(float y, const unet_format *format)
{
    float scaled = format->fixed_point ? y * format->scale : y / format->scale;
    if (scaled < (float)format->lo)
        scaled = (float)format->lo;
    if (scaled > (float)format->hi)
        scaled = (float)format->hi;
    return (int64_t)rintf(scaled);
}

/* ReLU and BatchNorm of a float result z of output channel o */
static float float_result(const unet_layer *layer, float z, int o)
{
    if (!layer->relu_batchnorm)
        return z;
    return (z > 0.0f ? z : 0.0f) * layer->alpha[o] + layer->beta[o];
}

/* Packed weight code k: bits [k * b, (k + 1) * b) of the byte stream, bit j of the stream
   being bit j % 8 of byte j / 8 (little endian), two's complement. */
static int weight_code(const unet_layer *layer, size_t k)
{
    const int bits = layer->weight_bits;
    const size_t bytes = (9 * (size_t)layer->in_channels * layer->out_channels * bits + 7) / 8;
    const size_t first = k * bits / 8;
    const int offset = (int)(k * bits % 8);
    unsigned window = layer->weight_codes[first];
    if (first + 1 < bytes)
        window |= (unsigned)layer->weight_codes[first + 1] << 8;
    window = (window >> offset) & ((1u << bits) - 1);
    return window >= (1u << (bits - 1)) ? (int)window - (1 << bits) : (int)window;
}

/* ---- one convolution: rows of accumulators, then each consumer's result ---- */

/* Weights of tap (ky, kx) and input channel i for every output channel, contiguous:
   order (ky, kx, in, out), so that the inner loop runs over output channels. */
static size_t tap_index(const unet_layer *layer, int ky, int kx, int i, int o)
{
    return (((size_t)ky * 3 + kx) * layer->in_channels + i) * layer->out_channels + o;
}

static void store_integer(const unet_layer *layer, const int32_t *acc, size_t at, tensor **out)
{
    for (int k = 0; k < layer->output_count; k++) {
        const unet_output *result = &layer->outputs[k];
        for (int o = 0; o < layer->out_channels; o++) {
            if (result->kind == FLOAT_VALUES) {
                /* one rounding, as PyTorch's vectorized addcmul (a fused multiply-add) */
                const float scale = (float)layer->accumulator_scale[o];
                const float z = fmaf((float)acc[o], scale, layer->bias[o]);
                ((float *)out[k]->data)[at + o] = float_result(layer, z, o);
            } else {
                int64_t v = result->multiplier[o] * (int64_t)acc[o] + result->offset[o];
                v = round_shift(v, result->shift);
                set_code(out[k], at + o, clamp(v, result->low[o], result->high[o]));
            }
        }
    }
}

static int convolve_integer(const unet_layer *layer, const tensor *in, tensor **out)
{
    const int height = in->height, width = in->width;
    const int cin = layer->in_channels, cout = layer->out_channels;
    const size_t taps = 9 * (size_t)cin * cout;
    int8_t *weights = buffer_alloc(taps);
    int32_t *acc = buffer_alloc((size_t)width * cout * sizeof(int32_t));
    if (weights == NULL || acc == NULL) {
        buffer_free(weights, taps);
        buffer_free(acc, (size_t)width * cout * sizeof(int32_t));
        return 0;
    }
    for (int o = 0; o < cout; o++)
        for (int ky = 0; ky < 3; ky++)
            for (int kx = 0; kx < 3; kx++)
                for (int i = 0; i < cin; i++) {
                    size_t k = (((size_t)o * 3 + ky) * 3 + kx) * cin + i;
                    weights[tap_index(layer, ky, kx, i, o)] = (int8_t)weight_code(layer, k);
                }
    const int8_t *codes = in->data;
    for (int y = 0; y < height; y++) {
        memset(acc, 0, (size_t)width * cout * sizeof(int32_t));
        for (int ky = 0; ky < 3; ky++) {
            const int row = y + ky - 1;
            if (row < 0 || row >= height)
                continue; /* zero padding */
            for (int x = 0; x < width; x++)
                for (int kx = 0; kx < 3; kx++) {
                    const int column = x + kx - 1;
                    if (column < 0 || column >= width)
                        continue;
                    const int8_t *pixel = codes + ((size_t)row * width + column) * cin;
                    int32_t *sums = acc + (size_t)x * cout;
                    for (int i = 0; i < cin; i++) {
                        const int32_t code = pixel[i];
                        if (code == 0)
                            continue; /* after ReLU most codes are zero */
                        const int8_t *w = weights + tap_index(layer, ky, kx, i, 0);
                        for (int o = 0; o < cout; o++)
                            sums[o] += w[o] * code;
                    }
                }
        }
        for (int x = 0; x < width; x++)
            store_integer(layer, acc + (size_t)x * cout, ((size_t)y * width + x) * cout, out);
    }
    buffer_free(weights, taps);
    buffer_free(acc, (size_t)width * cout * sizeof(int32_t));
    return 1;
}

static void store_float(const unet_layer *layer, const float *acc, size_t at, tensor **out)
{
    for (int k = 0; k < layer->output_count; k++) {
        const unet_output *result = &layer->outputs[k];
        for (int o = 0; o < layer->out_channels; o++) {
            const float y = float_result(layer, acc[o] + layer->bias[o], o);
            if (result->kind == QUANTIZED)
                set_code(out[k], at + o, quantize_value(y, result->format));
            else
                ((float *)out[k]->data)[at + o] = y;
        }
    }
}

static int convolve_float(const unet_layer *layer, const tensor *in, tensor **out)
{
    const int height = in->height, width = in->width;
    const int cin = layer->in_channels, cout = layer->out_channels;
    const size_t taps = 9 * (size_t)cin * cout;
    float *weights = buffer_alloc(taps * sizeof(float));
    float *acc = buffer_alloc((size_t)width * cout * sizeof(float));
    if (weights == NULL || acc == NULL) {
        buffer_free(weights, taps * sizeof(float));
        buffer_free(acc, (size_t)width * cout * sizeof(float));
        return 0;
    }
    for (int o = 0; o < cout; o++)
        for (int i = 0; i < cin; i++)
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++)
                    weights[tap_index(layer, ky, kx, i, o)] =
                        layer->weight[(((size_t)o * cin + i) * 3 + ky) * 3 + kx];
    const float *values = in->data;
    for (int y = 0; y < height; y++) {
        for (size_t k = 0; k < (size_t)width * cout; k++)
            acc[k] = 0.0f;
        for (int ky = 0; ky < 3; ky++) {
            const int row = y + ky - 1;
            if (row < 0 || row >= height)
                continue;
            for (int x = 0; x < width; x++)
                for (int kx = 0; kx < 3; kx++) {
                    const int column = x + kx - 1;
                    if (column < 0 || column >= width)
                        continue;
                    const float *pixel = values + ((size_t)row * width + column) * cin;
                    float *sums = acc + (size_t)x * cout;
                    for (int i = 0; i < cin; i++) {
                        const float value = pixel[i];
                        const float *w = weights + tap_index(layer, ky, kx, i, 0);
                        for (int o = 0; o < cout; o++)
                            sums[o] += w[o] * value;
                    }
                }
        }
        for (int x = 0; x < width; x++)
            store_float(layer, acc + (size_t)x * cout, ((size_t)y * width + x) * cout, out);
    }
    buffer_free(weights, taps * sizeof(float));
    buffer_free(acc, (size_t)width * cout * sizeof(float));
    return 1;
}

static int convolve(const unet_layer *layer, const tensor *in, tensor **out)
{
    return layer->integer ? convolve_integer(layer, in, out) : convolve_float(layer, in, out);
}

/* ---- conversions, pooling, upsampling ---- */

%(conversions)s/* 2x2 max pooling, stride 2 (on codes: quantization is monotone) */
static void max_pool(const tensor *in, tensor *out)
{
    const int channels = in->channels;
    for (int y = 0; y < out->height; y++)
        for (int x = 0; x < out->width; x++)
            for (int c = 0; c < channels; c++) {
                size_t corner = ((size_t)2 * y * in->width + 2 * x) * channels + c;
                size_t below = corner + (size_t)in->width * channels;
                size_t at = ((size_t)y * out->width + x) * channels + c;
                size_t four[4] = {corner, corner + channels, below, below + channels};
                if (in->storage == F32) {
                    const float *v = in->data;
                    float m = v[four[0]];
                    for (int k = 1; k < 4; k++)
                        m = v[four[k]] > m ? v[four[k]] : m;
                    ((float *)out->data)[at] = m;
                } else {
                    int64_t m = code_at(in, four[0]);
                    for (int k = 1; k < 4; k++)
                        m = code_at(in, four[k]) > m ? code_at(in, four[k]) : m;
                    set_code(out, at, m);
                }
            }
}

%(upsampling)s

#define TRY(step)                                                                               \
    do {                                                                                        \
        if (!(step))                                                                            \
            goto out_of_memory;                                                                 \
    } while (0)
"""

UPSAMPLING = {
    "bilinear": r"""
/* The neighbour that bilinear 2x upsampling (align_corners=False) mixes into output position
   `at` with weight 1/4 (the nearer source, at / 2, has weight 3/4). */
static int neighbour(int at, int n)
{
    const int k = at / 2;
    if (at % 2 == 0)
        return k > 0 ? k - 1 : 0;
    return k < n - 1 ? k + 1 : n - 1;
}

/* Float bilinear 2x upsampling, with PyTorch's weights and order of operations:
   along columns, then rows; position 0 takes the first source with weight 1. */
static void float_source(int at, int n, int *first, int *second, float *w1, float *w2)
{
    const int k = at / 2;
    if (at == 0) {
        *first = 0, *second = n > 1 ? 1 : 0, *w1 = 1.0f, *w2 = 0.0f;
    } else if (at % 2 == 0) {
        *first = k - 1, *second = k, *w1 = 0.25f, *w2 = 0.75f;
    } else {
        *first = k, *second = k < n - 1 ? k + 1 : k, *w1 = 0.75f, *w2 = 0.25f;
    }
}

static float upsampled_float(const tensor *s, int y, int x, int c)
{
    int r1, r2, c1, c2;
    float wr1, wr2, wc1, wc2;
    const float *v = s->data;
    float_source(y, s->height, &r1, &r2, &wr1, &wr2);
    float_source(x, s->width, &c1, &c2, &wc1, &wc2);
    const size_t row1 = (size_t)r1 * s->width, row2 = (size_t)r2 * s->width;
    const int n = s->channels;
    const float top = v[(row1 + c1) * n + c] * wc1 + v[(row1 + c2) * n + c] * wc2;
    const float bottom = v[(row2 + c1) * n + c] * wc1 + v[(row2 + c2) * n + c] * wc2;
    return top * wr1 + bottom * wr2;
}

/* out = concat(upsample(below), skip), upsampled channels first, in the consumer's input
   representation (format NULL: float values). Integer sources carry extra_bits more
   fractional bits: the numerator 9a + 3b + 3c + d is exact, then one rounding shift. */
static void upsample_concat(const tensor *below, int extra_bits, const tensor *skip,
                            const unet_format *format, tensor *out)
{
    const int up = below->channels, channels = out->channels;
    const size_t element = STORAGE_BYTES[out->storage];
    for (int y = 0; y < out->height; y++)
        for (int x = 0; x < out->width; x++) {
            const size_t at = ((size_t)y * out->width + x) * channels;
            const size_t near_row = (size_t)(y / 2) * below->width;
            const size_t far_row = (size_t)neighbour(y, below->height) * below->width;
            const int near_column = x / 2, far_column = neighbour(x, below->width);
            for (int c = 0; c < up; c++) {
                if (below->storage != F32) {
                    int64_t a = code_at(below, (near_row + near_column) * up + c);
                    int64_t b = code_at(below, (near_row + far_column) * up + c);
                    int64_t d = code_at(below, (far_row + near_column) * up + c);
                    int64_t e = code_at(below, (far_row + far_column) * up + c);
                    int64_t numerator = 9 * a + 3 * b + 3 * d + e;
                    int64_t code = round_shift(numerator, extra_bits + 4);
                    set_code(out, at + c, clamp(code, format->lo, format->hi));
                } else if (format != NULL) {
                    set_code(out, at + c, quantize_value(upsampled_float(below, y, x, c), format));
                } else {
                    ((float *)out->data)[at + c] = upsampled_float(below, y, x, c);
                }
            }
            const size_t from = ((size_t)y * out->width + x) * skip->channels;
            memcpy((char *)out->data + (at + up) * element,
                   (const char *)skip->data + from * element, skip->channels * element);
        }
}

""",
    "nearest": r"""
/* out = concat(upsample(below), skip), upsampled channels first: nearest-neighbour 2x
   upsampling repeats each value 2 x 2 (codes are already the consumer's: a copy). */
static void upsample_concat(const tensor *below, const tensor *skip, tensor *out)
{
    const size_t element = STORAGE_BYTES[out->storage];
    const size_t up = (size_t)below->channels * element, rest = (size_t)skip->channels * element;
    for (int y = 0; y < out->height; y++)
        for (int x = 0; x < out->width; x++) {
            char *to = (char *)out->data + ((size_t)y * out->width + x) * (up + rest);
            const size_t from = (size_t)(y / 2) * below->width + x / 2;
            memcpy(to, (const char *)below->data + from * up, up);
            memcpy(to + up, (const char *)skip->data + ((size_t)y * out->width + x) * rest, rest);
        }
}

""",
}
"""The upsampling of each ``UNetConfig.upsample`` mode, joined with the skip connection."""

CONVERSIONS = {
    "quantize": r"""
static void quantize(const tensor *in, const unet_format *format, tensor *out)
{
    const size_t count = (size_t)in->height * in->width * in->channels;
    for (size_t i = 0; i < count; i++)
        set_code(out, i, quantize_value(((const float *)in->data)[i], format));
}
""",
    "dequantize": r"""
static void dequantize(const tensor *in, const unet_format *format, tensor *out)
{
    const size_t count = (size_t)in->height * in->width * in->channels;
    for (size_t i = 0; i < count; i++)
        ((float *)out->data)[i] = (float)code_at(in, i) * format->step;
}
""",
}
"""The conversions of whole tensors, emitted when the dataflow uses them."""

PIXEL_LABELS = {
    "sigmoid": r"""
/* The mask value of one pixel's logit: 1 where sigmoid(logit) >= UNET_THRESHOLD, the
   probability in float32 as unetquant computes it, else 0. */
static unsigned char pixel_label(const float *logits)
{
    const float probability = 1.0f / (1.0f + expf(-logits[0]));
    return probability >= (float)UNET_THRESHOLD;
}

""",
    "argmax": r"""
/* The label value of each output channel: channel 0 the background, channel i the label
   value of class i. */
const unsigned char unet_label_values[UNET_OUT_CHANNELS] = {%(label_values)s};

/* The label value of one pixel's UNET_OUT_CHANNELS logits: the channel with the largest
   logit (softmax keeps their order, so the most probable class; the first on a tie). */
static unsigned char pixel_label(const float *logits)
{
    int best = 0;
    for (int c = 1; c < UNET_OUT_CHANNELS; c++)
        if (logits[c] > logits[best])
            best = c;
    return unet_label_values[best];
}

""",
}
"""How the program turns one pixel's logits into its output byte: ``sigmoid`` for a binary
model (one channel), ``argmax`` for a multi-class one (``%(label_values)s`` filled in)."""

MAIN = r"""
/* ---- the library entry and the program ---- */

%(pixel_label)sint unet_segment(const float *slice, int height, int width, unsigned char *mask)
{
    if (height < 1 || width < 1)
        return -2;
    const size_t count = (size_t)height * width * UNET_IN_CHANNELS;
    for (size_t i = 0; i < count; i++)
        if (!isfinite(slice[i]))
            return -2;
    const int multiple = 1 << UNET_DEPTH; /* pad to a multiple of 2**depth, edges replicated */
    const int padded_height = (height + multiple - 1) / multiple * multiple;
    const int padded_width = (width + multiple - 1) / multiple * multiple;
    tensor image = {0}, logits = {0};
    if (!tensor_new(&image, padded_height, padded_width, UNET_IN_CHANNELS, F32))
        return -1;
    const size_t pixel = UNET_IN_CHANNELS * sizeof(float);
    for (int y = 0; y < padded_height; y++)
        for (int x = 0; x < padded_width; x++) {
            const int from_y = y < height ? y : height - 1, from_x = x < width ? x : width - 1;
            memcpy((float *)image.data + ((size_t)y * padded_width + x) * UNET_IN_CHANNELS,
                   slice + ((size_t)from_y * width + from_x) * UNET_IN_CHANNELS, pixel);
        }
    if (!run_network(&image, &logits)) /* frees the image */
        return -1;
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
            mask[(size_t)y * width + x] =
                pixel_label((const float *)logits.data +
                            ((size_t)y * logits.width + x) * logits.channels);
    tensor_free(&logits);
    return 0;
}

#ifndef UNET_NO_MAIN /* the command line: unet IN.f32 OUT.u8 HEIGHT WIDTH [--memory] */
static int fail(const char *out_tmp, const char *message, const char *detail)
{
    fprintf(stderr, "unet: %s%s\n", message, detail);
    if (out_tmp != NULL)
        remove(out_tmp);
    return 1;
}

static int parse_size(const char *text, int *value)
{
    char *end;
    errno = 0;
    long parsed = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || parsed < 1 || parsed > (1L << 20))
        return 0;
    *value = (int)parsed;
    return 1;
}

/* Read HEIGHT x WIDTH float32 (little endian) into the padded image, then replicate the
   last row and column to the padded size. Returns an error message, or NULL. */
static const char *read_image(FILE *file, int height, int width, tensor *image)
{
    float *values = image->data;
    unsigned char bytes[4];
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
            for (int c = 0; c < image->channels; c++) {
                if (fread(bytes, 1, 4, file) != 4)
                    return "the input holds fewer than HEIGHT * WIDTH float32 values";
                uint32_t word = bytes[0] | (uint32_t)bytes[1] << 8 | (uint32_t)bytes[2] << 16 |
                                (uint32_t)bytes[3] << 24;
                float value;
                memcpy(&value, &word, sizeof value);
                if (!isfinite(value))
                    return "the input holds a value that is not a finite number";
                values[((size_t)y * image->width + x) * image->channels + c] = value;
            }
    if (fgetc(file) != EOF)
        return "the input holds more than HEIGHT * WIDTH float32 values";
    const size_t pixel = (size_t)image->channels;
    for (int y = 0; y < image->height; y++)
        for (int x = 0; x < image->width; x++)
            if (y >= height || x >= width) {
                int from_y = y < height ? y : height - 1, from_x = x < width ? x : width - 1;
                memcpy(values + ((size_t)y * image->width + x) * pixel,
                       values + ((size_t)from_y * image->width + from_x) * pixel,
                       pixel * sizeof(float));
            }
    return NULL;
}

static int write_outputs(const tensor *logits, int height, int width, const char *out,
                         const char *out_tmp)
{
    unsigned char *mask = buffer_alloc((size_t)height * width);
    if (mask == NULL)
        return fail(NULL, "out of memory for the mask", "");
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
            mask[(size_t)y * width + x] =
                pixel_label((const float *)logits->data +
                            ((size_t)y * logits->width + x) * logits->channels);
    FILE *file = fopen(out_tmp, "wb");
    int written = file != NULL && fwrite(mask, 1, (size_t)height * width, file) ==
                                      (size_t)height * width;
    written = file != NULL && fclose(file) == 0 && written;
    buffer_free(mask, (size_t)height * width);
    if (!written)
        return fail(out_tmp, "cannot write ", out_tmp);
    const char *dump = getenv("UNET_LOGITS");
    if (dump != NULL) { /* debugging: the cropped logits, float32 in this machine's order */
        FILE *logits_file = fopen(dump, "wb");
        int ok = logits_file != NULL;
        const size_t row = (size_t)width * logits->channels; /* channels last */
        for (int y = 0; ok && y < height; y++)
            ok = fwrite((const float *)logits->data + (size_t)y * logits->width * logits->channels,
                        sizeof(float), row, logits_file) == row;
        if (logits_file == NULL || fclose(logits_file) != 0 || !ok)
            return fail(out_tmp, "cannot write the logits to ", dump);
    }
    if (rename(out_tmp, out) != 0)
        return fail(out_tmp, "cannot rename the output to ", out);
    return 0;
}

int main(int argc, char **argv)
{
    int height, width;
    int memory = argc == 6 && strcmp(argv[5], "--memory") == 0;
    if (argc != 5 && !memory) {
        fprintf(stderr, "usage: %s IN.f32 OUT.u8 HEIGHT WIDTH [--memory]\n", argv[0]);
        return 2;
    }
    if (!parse_size(argv[3], &height) || !parse_size(argv[4], &width)) {
        fprintf(stderr, "unet: HEIGHT and WIDTH must be whole numbers from 1 to %ld, got %s %s\n",
                1L << 20, argv[3], argv[4]);
        return 2;
    }
    char out_tmp[4096];
    if (strlen(argv[2]) + 5 > sizeof out_tmp)
        return fail(NULL, "the output path is too long: ", argv[2]);
    sprintf(out_tmp, "%s.tmp", argv[2]);

    const int multiple = 1 << UNET_DEPTH; /* pad to a multiple of 2**depth */
    const int padded_height = (height + multiple - 1) / multiple * multiple;
    const int padded_width = (width + multiple - 1) / multiple * multiple;
    tensor image = {0}, logits = {0};
    if (!tensor_new(&image, padded_height, padded_width, UNET_IN_CHANNELS, F32))
        return fail(NULL, "out of memory for the image", "");
    FILE *file = fopen(argv[1], "rb");
    if (file == NULL) {
        tensor_free(&image);
        return fail(NULL, "cannot open ", argv[1]);
    }
    const char *problem = read_image(file, height, width, &image);
    fclose(file);
    if (problem != NULL) {
        tensor_free(&image);
        return fail(NULL, problem, "");
    }
    if (!run_network(&image, &logits))
        return fail(NULL, "out of memory running the network", "");
    int status = write_outputs(&logits, height, width, argv[2], out_tmp);
    tensor_free(&logits);
    if (status == 0 && memory) {
        printf("weight_bytes %lu\n", (unsigned long)unet_weight_bytes);
        printf("peak_activation_bytes %lu\n", (unsigned long)peak_bytes);
    }
    return status;
}
#endif /* UNET_NO_MAIN */
"""


# --- C text: the generated parts -------------------------------------------------------------
