"""The HTML page of `sdzero inspect` (index.html): each response's tokens coloured by their Phase 2 signal, and the
bucket charts. Everything is inline, and every piece of model text goes through html.escape."""

from __future__ import annotations

import html


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.resp{border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.5em .8em}
.meta{font-size:.85em;color:#555;margin-bottom:.3em}
.text{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7}
.t{border-radius:2px}
.fw{text-decoration:underline 2px #1f4fd1;text-underline-offset:3px}
.top{outline:1px solid #000}
.topd{border-bottom:2px dashed #000}
.end{font-size:.75em;color:#777;border:1px solid #bbb;padding:0 2px}
.cut{font-size:.75em;color:#a33;border:1px dashed #a33;padding:0 2px;margin-left:.3em}
.legend span{display:inline-block;width:2.2em;text-align:center;font-size:.8em}
.charts{display:flex;gap:2em;flex-wrap:wrap}
"""


def _colour(value: float, scale: float) -> str:
    alpha = min(1.0, max(0.0, value / scale)) if scale > 0 else 0.0
    return f"rgba(214,39,40,{alpha:.3f})"


def _chart(title: str, shares: list[float], top: float) -> str:
    width, height, pad = 360, 150, 20
    bars = []
    for b, share in enumerate(shares):
        w = (width - 2 * pad) / len(shares)
        h = (height - 2 * pad) * share / top if top > 0 else 0
        bars.append(f'<rect x="{pad + b * w + 1:.1f}" y="{height - pad - h:.1f}" width="{w - 2:.1f}" '
                    f'height="{h:.1f}" fill="#d62728"><title>bucket {b + 1}: {share:.1%}</title></rect>')
    label = f"{html.escape(title)}: top bucket {shares[0]:.1%}" if shares else f"{html.escape(title)}: no tokens"
    return (f'<figure><svg width="{width}" height="{height}" role="img">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
            + "".join(bars) + f"</svg><figcaption>{label}</figcaption></figure>")


def _response(index: int, row_id, signal, span, scale: float) -> str:
    """One response of the page: its tokens coloured by divergence, `signal` a TokenSignal."""
    step = set(signal.tokens_in_span(*span)) if span else set()

    def argmax(values):
        return max(range(len(values)), key=values.__getitem__) if values else None

    top, top_divergence = argmax(signal.token_kl_reward), argmax(signal.divergence)
    spans = []
    for t, (piece, tid, div, kl_reward) in enumerate(zip(signal.tokens, signal.ids, signal.divergence,
                                                        signal.token_kl_reward)):
        title = f"token {t} (id {tid}) {piece!r}\ndivergence {div:.4g}\ntoken KL reward {kl_reward:+.4g}"
        classes = ("t" + (" fw" if t in step else "") + (" top" if t == top else "")
                   + (" topd" if t == top_divergence else ""))
        # a piece with no text: the end-of-turn token that closes a finished answer, or a token whose text
        # falls in its neighbour's (a part of one character), shown as a dot
        ending = signal.finished and t == len(signal.ids) - 1
        shown = html.escape(piece) if piece else f'<span class="end">{"end" if ending else "·"}</span>'
        spans.append(f'<span class="{classes}" style="background:{_colour(div, scale)}" data-d="{div:.6g}" '
                     f'data-r="{kl_reward:.6g}" title="{html.escape(title)}">{shown}</span>')
    if not signal.finished:  # no end token was sampled: say so after the last token instead
        spans.append('<span class="cut">cut by the token cap</span>')
    mean = sum(signal.divergence) / len(signal.divergence) if signal.divergence else 0.0
    meta = (f"#{index} · {html.escape(str(row_id))} · reward {signal.reward:g} · "
            f"P_r: <q>{html.escape(signal.phrase)}</q> · {len(signal.ids)} tokens"
            + ("" if signal.finished else " (cut by the token cap)") + f" · mean divergence {mean:.3g}"
            + (" · first wrong step underlined" if step else ""))
    return (f'<div class="resp"><div class="meta">{meta}</div>'
            f'<div class="meta">{html.escape(signal.prompt)}</div><div class="text">{"".join(spans)}</div></div>')


# Recolours the tokens by the chosen signal (the page is coloured by divergence without it), and
# says how many tokens the page shows. "#reward" in the address opens the page on the token KL reward.
_SCRIPT = """
const tokens = Array.from(document.querySelectorAll('.t'));
function scaleOf(values) {
  const sorted = values.map(Math.abs).sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(0.99 * (sorted.length - 1))] || 1 : 1;
}
const scales = {d: scaleOf(tokens.map(t => +t.dataset.d)), r: scaleOf(tokens.map(t => +t.dataset.r))};
function paint(mode) {
  for (const t of tokens) {
    const v = +t.dataset[mode], a = Math.min(1, Math.abs(v) / scales[mode]).toFixed(3);
    t.style.background = v >= 0 ? `rgba(214,39,40,${a})` : `rgba(31,79,209,${a})`;
  }
  document.getElementById('mode-' + mode).checked = true;
}
for (const mode of ['d', 'r']) document.getElementById('mode-' + mode).addEventListener('change', () => paint(mode));
if (location.hash === '#reward') paint('r');
const n = document.querySelectorAll('.resp').length;
document.getElementById('status').textContent = `${tokens.length} tokens in ${n} responses`;
"""


def report_page(entries: list[tuple], summary: dict) -> str:
    """The page of `sdzero inspect`: `entries` are (row id, TokenSignal, first wrong step or None),
    `summary` what `inspect_run` returns."""
    values = sorted(d for _, s, _ in entries for d in s.divergence)
    # colour by the 99th percentile, so that a handful of outliers does not wash out the rest
    scale = values[int(0.99 * (len(values) - 1))] if values else 1.0
    legend = "".join(f'<span style="background:{_colour(scale * i / 5, scale)}">{scale * i / 5:.2g}</span>'
                     for i in range(6))
    shares = summary["buckets"]
    top = max(shares["wrong"] + shares["right"] + [0.0])

    def rate(measure):
        loc = summary["localization"][measure]["wrong"]
        return "n/a" if loc["ratio"] is None else (f"{loc['top_kl_in_first_wrong_step']:.1%} vs chance "
                                                   f"{loc['chance']:.1%} (ratio {loc['ratio']:.2f}, n={loc['n']})")
    lab = summary["localization"] is not None
    located = (f"<p>Token with the highest token KL reward inside the first wrong step: {rate('token_kl_reward')};\n"
               f"highest-divergence token: {rate('divergence')}.</p>") if lab else ""
    underline = "On lab problems the first wrong step of a wrong answer is underlined;\n" if lab else ""
    charts = _chart("wrong answers (r = 0)", shares["wrong"], top) + _chart("right answers (r = 1)",
                                                                           shares["right"], top)
    sections = []
    for name, wanted in (("Wrong answers (r = 0)", False), ("Right answers (r = 1)", True)):
        blocks = [_response(i, row_id, s, span, scale) for i, (row_id, s, span) in enumerate(entries)
                  if (s.reward >= 1.0) == wanted]
        sections.append(f"<h2>{name}: {len(blocks)}</h2>" + ("".join(blocks) or "<p>none</p>"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SD-Zero token signal</title><style>{_STYLE}</style></head>
<body>
<h1>Teacher-student divergence per token</h1>
<p>Student <code>{html.escape(summary['student'])}</code>, teacher <code>{html.escape(summary['teacher'])}</code>,
{html.escape(str(summary['divergence']))} divergence on the teacher's top-{html.escape(str(summary['top_k']))} tokens.
Each token is coloured by its Phase 2 loss term; hover for the numbers (divergence, and the token KL
reward log p_S(y_t) - log p_T(y_t)). {underline}each response's highest token KL reward is outlined, its
highest divergence dashed underneath. A response cut by the token cap is marked so; it has no end token.</p>
<p>Colour by: <label><input type="radio" name="mode" id="mode-d" checked> divergence</label>
<label><input type="radio" name="mode" id="mode-r"> token KL reward (red: the student likes the token more
than the teacher; blue: less)</label> · <span id="status"></span></p>
<p class="legend">divergence: {legend} (and above)</p>
<h2>How concentrated is the divergence?</h2>
<p>Tokens sorted by divergence and cut into {len(shares['wrong'] or shares['right'])} equal-count buckets;
each bar is a bucket's share of the total divergence.</p>
<div class="charts">{charts}</div>
{located}
{"".join(sections)}
<script>{_SCRIPT}</script>
</body></html>
"""
