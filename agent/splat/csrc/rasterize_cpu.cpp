// Tile-based Gaussian splatting rasterization on the CPU: binning, forward and backward.
//
// Follows gsplat 1.5.3's CUDA kernels (RasterizeToPixels3DGSFwd/Bwd.cu, IntersectTile.cu):
// per tile, Gaussians sorted front to back by depth (ties by index); per pixel
// sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with (dx, dy) = mean2d - pixel centre,
// alpha = min(0.999, opacity * exp(-sigma)), skipped when sigma < 0 or alpha < 1/255;
// a pixel stops (exclusively) when its transmittance would drop to <= 1e-4.
//
// CPU-specific: a tile is processed Gaussian by Gaussian (outer loop) over the pixels of the
// Gaussian's bounding box inside the tile (inner loop). Outside the box alpha < 1/255, so the
// result is the same as testing every pixel against every Gaussian of the tile. Tiles run in
// parallel (at::parallel_for); the backward writes one gradient row per intersection, which is
// then summed per Gaussian, so no atomics are needed.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransmittanceMin = 1e-4;

struct TileGrid {
    int64_t width, height, tile_size, tiles_x, tiles_y;
    TileGrid(int64_t w, int64_t h, int64_t t)
        : width(w), height(h), tile_size(t), tiles_x((w + t - 1) / t), tiles_y((h + t - 1) / t) {}
    int64_t n_tiles() const { return tiles_x * tiles_y; }
};

// Pixel range [lo, hi] (inclusive) whose centres can lie within `radius` of `mean`,
// clipped to [first, last]. One pixel of margin against rounding.
inline void pixel_span(double mean, double radius, int64_t first, int64_t last, int64_t &lo, int64_t &hi) {
    double a = std::floor(mean - radius - 0.5) - 1.0;
    double b = std::ceil(mean + radius - 0.5) + 1.0;
    lo = a < (double)first ? first : (a > (double)last + 1 ? last + 1 : (int64_t)a);
    hi = b > (double)last ? last : (b < (double)first - 1 ? first - 1 : (int64_t)b);
}

template <typename scalar_t>
std::vector<torch::Tensor> bin_impl(const torch::Tensor &means2d, const torch::Tensor &radii,
                                    const torch::Tensor &depths, const TileGrid &grid) {
    const int64_t I = means2d.size(0), N = means2d.size(1);
    const scalar_t *m = means2d.data_ptr<scalar_t>();
    const int32_t *r = radii.data_ptr<int32_t>();
    const scalar_t *d = depths.data_ptr<scalar_t>();
    const int64_t T = grid.n_tiles();
    const double ts = (double)grid.tile_size;

    // Tile rectangle per Gaussian, as gsplat's isect_tiles: [floor(c - r), ceil(c + r)) in tile units.
    std::vector<int32_t> rect((size_t)(I * N * 4), 0);
    std::vector<int64_t> counts((size_t)(I * T + 1), 0);
    for (int64_t g = 0; g < I * N; ++g) {
        if (r[2 * g] <= 0 || r[2 * g + 1] <= 0) continue;
        const double tx = m[2 * g] / ts, ty = m[2 * g + 1] / ts;
        const double rx = r[2 * g] / ts, ry = r[2 * g + 1] / ts;
        auto clampi = [](double v, int64_t hi) { return (int32_t)std::min<double>(std::max<double>(v, 0.0), (double)hi); };
        int32_t x0 = clampi(std::floor(tx - rx), grid.tiles_x), x1 = clampi(std::ceil(tx + rx), grid.tiles_x);
        int32_t y0 = clampi(std::floor(ty - ry), grid.tiles_y), y1 = clampi(std::ceil(ty + ry), grid.tiles_y);
        rect[4 * g] = x0; rect[4 * g + 1] = x1; rect[4 * g + 2] = y0; rect[4 * g + 3] = y1;
        const int64_t image = g / N;
        for (int32_t y = y0; y < y1; ++y)
            for (int32_t x = x0; x < x1; ++x) counts[image * T + y * grid.tiles_x + x + 1]++;
    }
    for (int64_t t = 0; t < I * T; ++t) counts[t + 1] += counts[t];
    const int64_t n_isects = counts[I * T];
    auto offsets = torch::from_blob(counts.data(), {I * T + 1}, torch::kInt64).clone();
    auto flat = torch::empty({n_isects}, torch::kInt64);
    int64_t *f = flat.data_ptr<int64_t>();
    std::vector<int64_t> cursor(counts.begin(), counts.end() - 1);
    for (int64_t g = 0; g < I * N; ++g) {
        const int32_t *rc = &rect[4 * g];
        const int64_t image = g / N;
        for (int32_t y = rc[2]; y < rc[3]; ++y)
            for (int32_t x = rc[0]; x < rc[1]; ++x) f[cursor[image * T + y * grid.tiles_x + x]++] = g;
    }
    // Front to back within each tile; ids were inserted in increasing order, so a stable sort
    // by depth breaks ties by index (as gsplat's radix sort does).
    at::parallel_for(0, I * T, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            std::stable_sort(f + counts[t], f + counts[t + 1], [d](int64_t a, int64_t b) { return d[a] < d[b]; });
        }
    });
    return {offsets, flat};
}

// Per-Gaussian data gathered once per intersection list entry.
template <typename scalar_t>
struct Splat {
    scalar_t mx, my, a, b, c, opacity, sigma_cut;
    int64_t x0, x1, y0, y1;  // pixel box inside the tile, inclusive
};

template <typename scalar_t>
inline bool load_splat(const scalar_t *m, const scalar_t *cn, const scalar_t *op, const int32_t *r, int64_t g,
                       int64_t px0, int64_t px1, int64_t py0, int64_t py1, Splat<scalar_t> &s) {
    s.opacity = op[g];
    if (!(s.opacity >= (scalar_t)kAlphaMin)) return false;  // alpha can never reach the threshold
    s.mx = m[2 * g]; s.my = m[2 * g + 1];
    s.a = cn[3 * g]; s.b = cn[3 * g + 1]; s.c = cn[3 * g + 2];
    // alpha >= 1/255  <=>  sigma <= log(255 * opacity); a small margin keeps the exact test below decisive.
    s.sigma_cut = (scalar_t)(std::log(s.opacity / kAlphaMin) + 1e-3);
    pixel_span((double)s.mx, (double)r[2 * g], px0, px1, s.x0, s.x1);
    pixel_span((double)s.my, (double)r[2 * g + 1], py0, py1, s.y0, s.y1);
    return s.x0 <= s.x1 && s.y0 <= s.y1;
}

// Columns [lo, hi] of row offset dy (= mean_y - pixel centre y) where sigma <= sigma_cut, clipped to the
// splat's box: the roots of 0.5 a dx^2 + b dy dx + 0.5 c dy^2 - cut = 0 in dx = mean_x - (x + 0.5).
// Returns false when the row misses the ellipse. The span is widened by a pixel against rounding;
// the exact per-pixel test still decides.
template <typename scalar_t>
inline bool row_span(const Splat<scalar_t> &s, scalar_t dy, int64_t &lo, int64_t &hi) {
    const double a = s.a, b = s.b, c = s.c;
    const double disc = (b * b - a * c) * (double)dy * (double)dy + 2.0 * a * (double)s.sigma_cut;
    if (!(a > 0.0)) {  // not positive definite: test the whole box
        lo = s.x0;
        hi = s.x1;
        return true;
    }
    if (disc < 0.0) return false;
    const double root = std::sqrt(disc);
    const double dx_lo = (-b * dy - root) / a, dx_hi = (-b * dy + root) / a;
    const double x_lo = std::floor((double)s.mx - 0.5 - dx_hi) - 1.0;
    const double x_hi = std::ceil((double)s.mx - 0.5 - dx_lo) + 1.0;
    lo = x_lo > (double)s.x0 ? (int64_t)x_lo : s.x0;
    hi = x_hi < (double)s.x1 ? (int64_t)x_hi : s.x1;
    return lo <= hi;
}

// Forward. Per tile: transmittance Tr[p] (> 0 while the pixel is live; a stopped pixel keeps -T),
// accumulators acc[ch * P + p], last contributing list index lastk[p] (-1: none).
template <typename scalar_t, int CH>
std::vector<torch::Tensor> forward_impl(const torch::Tensor &means2d, const torch::Tensor &conics,
                                        const torch::Tensor &colors, const torch::Tensor &opacities,
                                        const torch::Tensor &radii, const torch::Tensor &offsets,
                                        const torch::Tensor &flat, const TileGrid &grid) {
    const int64_t I = means2d.size(0);
    const int64_t H = grid.height, W = grid.width, T = grid.n_tiles();
    auto opts = means2d.options();
    auto out = torch::zeros({I, H, W, CH}, opts);
    auto t_final = torch::ones({I, H, W}, opts);
    auto last = torch::full({I, H, W}, -1, torch::kInt32);

    const scalar_t *m = means2d.data_ptr<scalar_t>(), *cn = conics.data_ptr<scalar_t>();
    const scalar_t *col = colors.data_ptr<scalar_t>(), *op = opacities.data_ptr<scalar_t>();
    const int32_t *r = radii.data_ptr<int32_t>();
    const int64_t *off = offsets.data_ptr<int64_t>(), *f = flat.data_ptr<int64_t>();
    scalar_t *o = out.data_ptr<scalar_t>(), *tf = t_final.data_ptr<scalar_t>();
    int32_t *lst = last.data_ptr<int32_t>();
    const scalar_t alpha_min = (scalar_t)kAlphaMin, alpha_max = (scalar_t)kAlphaMax;
    const scalar_t t_min = (scalar_t)kTransmittanceMin;

    at::parallel_for(0, I * T, 1, [&](int64_t begin, int64_t end) {
        const int64_t ts = grid.tile_size, P = ts * ts;
        std::vector<scalar_t> Tr_v(P), acc_v(P * CH);
        std::vector<int32_t> lastk_v(P);
        scalar_t *Tr = Tr_v.data(), *acc = acc_v.data();
        int32_t *lastk = lastk_v.data();
        for (int64_t it = begin; it < end; ++it) {
            const int64_t image = it / T, tile = it % T;
            const int64_t px0 = (tile % grid.tiles_x) * ts, py0 = (tile / grid.tiles_x) * ts;
            const int64_t px1 = std::min(px0 + ts, W) - 1, py1 = std::min(py0 + ts, H) - 1;
            const int64_t tw = px1 - px0 + 1, npix = tw * (py1 - py0 + 1);
            std::fill(Tr, Tr + npix, (scalar_t)1);
            std::fill(acc, acc + P * CH, (scalar_t)0);
            std::fill(lastk, lastk + npix, -1);
            int64_t n_done = 0;
            Splat<scalar_t> s;
            for (int64_t k = off[it]; k < off[it + 1] && n_done < npix; ++k) {
                const int64_t g = f[k];
                if (!load_splat(m, cn, op, r, g, px0, px1, py0, py1, s)) continue;
                scalar_t cg[CH];
                for (int ch = 0; ch < CH; ++ch) cg[ch] = col[g * CH + ch];
                const int32_t k32 = (int32_t)k;
                const scalar_t sa = s.a, sb = s.b, sc = s.c, smx = s.mx, sop = s.opacity;
                for (int64_t y = s.y0; y <= s.y1; ++y) {
                    const scalar_t dy = s.my - ((scalar_t)y + (scalar_t)0.5);
                    int64_t xa, xb;
                    if (!row_span(s, dy, xa, xb)) continue;
                    const int64_t row = (y - py0) * tw - px0;
                    for (int64_t x = xa; x <= xb; ++x) {
                        const int64_t p = row + x;
                        const scalar_t Tp = Tr[p];
                        if (!(Tp > 0)) continue;  // stopped
                        const scalar_t dx = smx - ((scalar_t)x + (scalar_t)0.5);
                        const scalar_t sigma = (scalar_t)0.5 * (sa * dx * dx + sc * dy * dy) + sb * dx * dy;
                        if (sigma < 0 || sigma > s.sigma_cut) continue;
                        const scalar_t alpha = std::min(alpha_max, sop * std::exp(-sigma));
                        if (alpha < alpha_min) continue;
                        const scalar_t next_T = Tp * (1 - alpha);
                        if (next_T <= t_min) {
                            Tr[p] = -Tp;
                            ++n_done;
                            continue;
                        }
                        const scalar_t w = alpha * Tp;
                        for (int ch = 0; ch < CH; ++ch) acc[ch * P + p] += w * cg[ch];
                        Tr[p] = next_T;
                        lastk[p] = k32;
                    }
                }
            }
            for (int64_t y = py0; y <= py1; ++y) {
                for (int64_t x = px0; x <= px1; ++x) {
                    const int64_t p = (y - py0) * tw + (x - px0);
                    const int64_t pix = (image * H + y) * W + x;
                    tf[pix] = std::abs(Tr[p]);
                    lst[pix] = lastk[p];
                    for (int ch = 0; ch < CH; ++ch) o[pix * CH + ch] = acc[ch * P + p];
                }
            }
        }
    });
    return {out, t_final, last};
}

template <typename scalar_t, int CH>
std::vector<torch::Tensor> backward_impl(const torch::Tensor &means2d, const torch::Tensor &conics,
                                         const torch::Tensor &colors, const torch::Tensor &opacities,
                                         const torch::Tensor &radii, const torch::Tensor &offsets,
                                         const torch::Tensor &flat, const torch::Tensor &t_final,
                                         const torch::Tensor &last, const torch::Tensor &v_out,
                                         const torch::Tensor &v_alpha_out, const TileGrid &grid) {
    const int64_t I = means2d.size(0), N = means2d.size(1);
    const int64_t H = grid.height, W = grid.width, T = grid.n_tiles();
    const int64_t n_isects = flat.size(0);
    constexpr int64_t G = 6 + CH;  // per intersection: d mean2d (2), d conic (3), d opacity (1), d colour (CH)
    auto opts = means2d.options();
    auto grads = torch::zeros({n_isects, G}, opts);

    const scalar_t *m = means2d.data_ptr<scalar_t>(), *cn = conics.data_ptr<scalar_t>();
    const scalar_t *col = colors.data_ptr<scalar_t>(), *op = opacities.data_ptr<scalar_t>();
    const int32_t *r = radii.data_ptr<int32_t>();
    const int64_t *off = offsets.data_ptr<int64_t>(), *f = flat.data_ptr<int64_t>();
    const scalar_t *tf = t_final.data_ptr<scalar_t>(), *vo = v_out.data_ptr<scalar_t>();
    const scalar_t *va = v_alpha_out.data_ptr<scalar_t>();
    const int32_t *lst = last.data_ptr<int32_t>();
    scalar_t *gr = grads.data_ptr<scalar_t>();
    const scalar_t alpha_min = (scalar_t)kAlphaMin, alpha_max = (scalar_t)kAlphaMax;

    at::parallel_for(0, I * T, 1, [&](int64_t begin, int64_t end) {
        const int64_t ts = grid.tile_size, P = ts * ts;
        std::vector<scalar_t> Tr_v(P), Tfin_v(P), buf_v(P * CH), vpix_v(P * CH), vap_v(P);
        std::vector<int32_t> lastk_v(P);
        scalar_t *Tr = Tr_v.data(), *Tfin = Tfin_v.data(), *buf = buf_v.data(), *vpix = vpix_v.data();
        scalar_t *vap = vap_v.data();
        int32_t *lastk = lastk_v.data();
        for (int64_t it = begin; it < end; ++it) {
            if (off[it] == off[it + 1]) continue;
            const int64_t image = it / T, tile = it % T;
            const int64_t px0 = (tile % grid.tiles_x) * ts, py0 = (tile / grid.tiles_x) * ts;
            const int64_t px1 = std::min(px0 + ts, W) - 1, py1 = std::min(py0 + ts, H) - 1;
            const int64_t tw = px1 - px0 + 1;
            int64_t k_max = -1;
            std::fill(buf, buf + P * CH, (scalar_t)0);
            for (int64_t y = py0; y <= py1; ++y) {
                for (int64_t x = px0; x <= px1; ++x) {
                    const int64_t p = (y - py0) * tw + (x - px0);
                    const int64_t pix = (image * H + y) * W + x;
                    Tr[p] = Tfin[p] = tf[pix];
                    lastk[p] = lst[pix];
                    k_max = std::max<int64_t>(k_max, lst[pix]);
                    vap[p] = va[pix];
                    for (int ch = 0; ch < CH; ++ch) vpix[ch * P + p] = vo[pix * CH + ch];
                }
            }
            Splat<scalar_t> s;
            for (int64_t k = k_max; k >= off[it]; --k) {
                const int64_t g = f[k];
                if (!load_splat(m, cn, op, r, g, px0, px1, py0, py1, s)) continue;
                scalar_t cg[CH];
                for (int ch = 0; ch < CH; ++ch) cg[ch] = col[g * CH + ch];
                const int32_t k32 = (int32_t)k;
                const scalar_t sa = s.a, sb = s.b, sc = s.c, smx = s.mx, sop = s.opacity;
                scalar_t v_mx = 0, v_my = 0, v_a = 0, v_b = 0, v_c = 0, v_op = 0;
                scalar_t vcol[CH];
                for (int ch = 0; ch < CH; ++ch) vcol[ch] = 0;
                for (int64_t y = s.y0; y <= s.y1; ++y) {
                    const scalar_t dy = s.my - ((scalar_t)y + (scalar_t)0.5);
                    int64_t xa, xb;
                    if (!row_span(s, dy, xa, xb)) continue;
                    const int64_t row = (y - py0) * tw - px0;
                    for (int64_t x = xa; x <= xb; ++x) {
                        const int64_t p = row + x;
                        if (k32 > lastk[p]) continue;
                        const scalar_t dx = smx - ((scalar_t)x + (scalar_t)0.5);
                        const scalar_t sigma = (scalar_t)0.5 * (sa * dx * dx + sc * dy * dy) + sb * dx * dy;
                        if (sigma < 0 || sigma > s.sigma_cut) continue;
                        const scalar_t vis = std::exp(-sigma);
                        const scalar_t alpha = std::min(alpha_max, sop * vis);
                        if (alpha < alpha_min) continue;
                        const scalar_t ra = 1 / (1 - alpha);
                        const scalar_t Tn = Tr[p] * ra;
                        Tr[p] = Tn;
                        const scalar_t fac = alpha * Tn;
                        scalar_t v_alpha = Tfin[p] * ra * vap[p];
                        for (int ch = 0; ch < CH; ++ch) {
                            const scalar_t vp = vpix[ch * P + p];
                            vcol[ch] += fac * vp;
                            v_alpha += (cg[ch] * Tn - buf[ch * P + p] * ra) * vp;
                            buf[ch * P + p] += cg[ch] * fac;
                        }
                        if (sop * vis <= alpha_max) {
                            const scalar_t v_sigma = -sop * vis * v_alpha;
                            v_a += (scalar_t)0.5 * v_sigma * dx * dx;
                            v_b += v_sigma * dx * dy;
                            v_c += (scalar_t)0.5 * v_sigma * dy * dy;
                            v_mx += v_sigma * (sa * dx + sb * dy);
                            v_my += v_sigma * (sb * dx + sc * dy);
                            v_op += vis * v_alpha;
                        }
                    }
                }
                scalar_t *gk = gr + k * G;
                gk[0] = v_mx; gk[1] = v_my; gk[2] = v_a; gk[3] = v_b; gk[4] = v_c; gk[5] = v_op;
                for (int ch = 0; ch < CH; ++ch) gk[6 + ch] = vcol[ch];
            }
        }
    });

    // Sum the intersection rows per Gaussian.
    auto v_means2d = torch::zeros({I, N, 2}, opts), v_conics = torch::zeros({I, N, 3}, opts);
    auto v_colors = torch::zeros({I, N, CH}, opts), v_opacities = torch::zeros({I, N}, opts);
    scalar_t *vm = v_means2d.data_ptr<scalar_t>(), *vc = v_conics.data_ptr<scalar_t>();
    scalar_t *vcl = v_colors.data_ptr<scalar_t>(), *vop = v_opacities.data_ptr<scalar_t>();
    for (int64_t k = 0; k < n_isects; ++k) {
        const int64_t g = f[k];
        const scalar_t *gk = gr + k * G;
        vm[2 * g] += gk[0]; vm[2 * g + 1] += gk[1];
        vc[3 * g] += gk[2]; vc[3 * g + 1] += gk[3]; vc[3 * g + 2] += gk[4];
        vop[g] += gk[5];
        for (int ch = 0; ch < CH; ++ch) vcl[g * CH + ch] += gk[6 + ch];
    }
    return {v_means2d, v_conics, v_colors, v_opacities};
}

void check_inputs(const torch::Tensor &means2d, const torch::Tensor &conics, const torch::Tensor &colors,
                  const torch::Tensor &opacities, const torch::Tensor &radii) {
    TORCH_CHECK(means2d.dim() == 3 && means2d.size(2) == 2, "means2d must be [I, N, 2]");
    const auto I = means2d.size(0), N = means2d.size(1);
    TORCH_CHECK(conics.sizes() == torch::IntArrayRef({I, N, 3}), "conics must be [I, N, 3]");
    TORCH_CHECK(colors.dim() == 3 && colors.size(0) == I && colors.size(1) == N, "colors must be [I, N, CH]");
    TORCH_CHECK(opacities.sizes() == torch::IntArrayRef({I, N}), "opacities must be [I, N]");
    TORCH_CHECK(radii.sizes() == torch::IntArrayRef({I, N, 2}) && radii.scalar_type() == torch::kInt32,
                "radii must be int32 [I, N, 2]");
    for (const auto *t : {&means2d, &conics, &colors, &opacities}) {
        TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "inputs must be contiguous CPU tensors");
        TORCH_CHECK(t->scalar_type() == means2d.scalar_type(), "inputs must share one floating dtype");
    }
    TORCH_CHECK(radii.is_contiguous(), "radii must be contiguous");
}

}  // namespace

std::vector<torch::Tensor> bin_gaussians(torch::Tensor means2d, torch::Tensor radii, torch::Tensor depths,
                                         int64_t width, int64_t height, int64_t tile_size) {
    TileGrid grid(width, height, tile_size);
    std::vector<torch::Tensor> res;
    AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "bin_gaussians", [&] {
        res = bin_impl<scalar_t>(means2d.contiguous(), radii.contiguous(), depths.contiguous(), grid);
    });
    return res;
}

std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                             torch::Tensor opacities, torch::Tensor radii, torch::Tensor offsets,
                                             torch::Tensor flat, int64_t width, int64_t height, int64_t tile_size) {
    check_inputs(means2d, conics, colors, opacities, radii);
    TileGrid grid(width, height, tile_size);
    std::vector<torch::Tensor> res;
    TORCH_CHECK(flat.size(0) < INT32_MAX, "too many tile intersections for int32 indices");
    AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_forward", [&] {
        switch (colors.size(2)) {
        case 1: res = forward_impl<scalar_t, 1>(means2d, conics, colors, opacities, radii, offsets, flat, grid); break;
        case 3: res = forward_impl<scalar_t, 3>(means2d, conics, colors, opacities, radii, offsets, flat, grid); break;
        case 4: res = forward_impl<scalar_t, 4>(means2d, conics, colors, opacities, radii, offsets, flat, grid); break;
        default: TORCH_CHECK(false, "colors must have 1, 3 or 4 channels, got ", colors.size(2));
        }
    });
    return res;
}

std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor radii, torch::Tensor offsets,
                                              torch::Tensor flat, torch::Tensor t_final, torch::Tensor last,
                                              torch::Tensor v_out, torch::Tensor v_alpha, int64_t width,
                                              int64_t height, int64_t tile_size) {
    check_inputs(means2d, conics, colors, opacities, radii);
    TileGrid grid(width, height, tile_size);
    std::vector<torch::Tensor> res;
    TORCH_CHECK(last.scalar_type() == torch::kInt32, "last must be int32 (from rasterize_forward)");
    AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "rasterize_backward", [&] {
        auto tf = t_final.contiguous(), ls = last.contiguous(), vo = v_out.contiguous(), va = v_alpha.contiguous();
        switch (colors.size(2)) {
        case 1: res = backward_impl<scalar_t, 1>(means2d, conics, colors, opacities, radii, offsets, flat, tf, ls, vo, va, grid); break;
        case 3: res = backward_impl<scalar_t, 3>(means2d, conics, colors, opacities, radii, offsets, flat, tf, ls, vo, va, grid); break;
        case 4: res = backward_impl<scalar_t, 4>(means2d, conics, colors, opacities, radii, offsets, flat, tf, ls, vo, va, grid); break;
        default: TORCH_CHECK(false, "colors must have 1, 3 or 4 channels, got ", colors.size(2));
        }
    });
    return res;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bin_gaussians", &bin_gaussians, "Tile intersection lists sorted front to back");
    m.def("rasterize_forward", &rasterize_forward, "Alpha compositing per tile (forward)");
    m.def("rasterize_backward", &rasterize_backward, "Alpha compositing per tile (backward)");
}
