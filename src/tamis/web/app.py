"""The monitor's web app (Starlette): server-rendered pages, each with a live part that the page's
small script polls with ``If-None-Match`` (ETags) and swaps in when it changed, so nothing
reloads.

Pages: ``/`` pipeline (schemes with start/abort/reset, jobs), ``/job`` (a job's logs),
``/micrographs`` (CTF and picks over the session, the CTF selection threshold), ``/micrograph``
(one micrograph with its picks), ``/class2d`` (a 2D job's classes by the score the selection
used: the ranker's, times the particle screen's verdict on the class when it ran; change the
selection and save it as a new Select job), ``/map`` (central slices and FSC).

Security: the server binds to 127.0.0.1 unless told otherwise; with a token (required off
localhost) every request must carry it (``?token=`` once, then a cookie, or the
``X-Tamis-Token`` header). Files are served only from inside the project. Actions are POSTs
carrying the page's CSRF value and, when the browser sends an Origin, the server's own origin.
"""

from __future__ import annotations

import hashlib
import html
import json
import secrets
from pathlib import Path
from urllib.parse import parse_qs, quote

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from tamis.errors import TamisError
from tamis.web import actions, render, view

__all__ = ["create_app"]

TABLE_ROWS = 300  # micrograph table rows per page view
PICK_CIRCLE_PX = 40.0  # diameter of the circles drawn at picks (micrograph pixels)

_STYLE = """body{font-family:sans-serif;margin:0}nav{background:#223;padding:8px 16px}
nav a{color:#dde;margin-right:18px;text-decoration:none}nav a.on{color:#fff;font-weight:bold}
main{padding:12px 20px;max-width:1300px}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;font-size:13px}
.Succeeded{color:#186a18}.Failed{color:#b00}.Running{color:#b60}.Aborted{color:#777}
pre{background:#f4f4f4;padding:8px;max-height:360px;overflow:auto;font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.cls{border:3px solid #ccc;padding:2px;
font-size:11px;text-align:center;cursor:pointer;width:132px}.cls.sel{border-color:#2a2}
.cls img{display:block;width:128px;height:128px}.msg{padding:6px;background:#ffd}
.err{padding:6px;background:#fdd}button{margin:0 2px}"""

_SCRIPT = """
const live = document.getElementById('live');
let etag = live ? live.dataset.etag : null;
async function poll() {
  if (!live || document.body.dataset.dirty === '1') return;
  try {
    const r = await fetch(live.dataset.src, {headers: {'If-None-Match': etag || ''}});
    if (r.status === 200) {
      etag = r.headers.get('ETag');
      live.innerHTML = await r.text();
      if (window.afterLive) window.afterLive();
    }
  } catch (e) {}
}
setInterval(poll, POLL_MS);
"""

_CLASS_SCRIPT = """
function toggle(el) {
  el.classList.toggle('sel');
  document.body.dataset.dirty = '1';
  const chosen = [...document.querySelectorAll('.cls.sel')].map(e => e.dataset.n);
  document.getElementById('classes').value = chosen.join(' ');
  document.getElementById('nsel').textContent = chosen.length;
}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _confirm(question: str) -> str:
    """An ``onsubmit`` value asking ``question``: the text as a JSON string, so a name with
    quotes cannot break out of it, then escaped for the attribute."""
    return _e(f"return confirm({json.dumps(question)})")


def _q(x) -> str:
    return quote(str(x), safe="")


def _fmt(v, spec: str = ".1f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "" if not np.isfinite(f) else format(f, spec)


def _network(used: float, network: float) -> str:
    """The network's own score on a class tile, where the particle screen moved it."""
    return f" (net {network:.2f})" if np.isfinite(network) and used != network else ""


def _passing(share: float) -> str:
    """A class tile's share of particles passing the particle screen, when it ran."""
    return f", {100 * share:.0f}% pass" if np.isfinite(share) else ""


class _Monitor:
    def __init__(self, root: Path, token: str | None, poll_ms: int) -> None:
        self.root, self.token, self.poll_ms = root, token, poll_ms
        self.csrf = secrets.token_urlsafe(24)
        self.pngs = render.PngCache()

    # ---- page frame --------------------------------------------------------------------------

    def page(self, title: str, active: str, body: str, live: str = "", live_src: str = "",
             script: str = "") -> HTMLResponse:  # fmt: skip
        nav = "".join(
            f'<a href="{href}" class="{"on" if key == active else ""}">{label}</a>'
            for key, href, label in (
                ("pipeline", "/", "Pipeline"),
                ("micrographs", "/micrographs", "Micrographs"),
                ("class2d", "/class2d", "2D classes"),
                ("map", "/map", "3D map"),
            )
        )
        live_div = ""
        if live_src:
            live_div = (
                f'<div id="live" data-src="{_e(live_src)}" data-etag="{_etag(live)}">{live}</div>'
            )
        doc = (
            f'<!doctype html><html><head><meta charset="utf-8"><title>tamis: {_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><nav>{nav}"
            f'<span style="color:#99a;float:right">{_e(self.root)}</span></nav>'
            f"<main><h2>{_e(title)}</h2>{body}{live_div}</main>"
            f"<script>{script}{_SCRIPT.replace('POLL_MS', str(self.poll_ms))}</script>"
            "</body></html>"
        )
        return HTMLResponse(doc)

    def csrf_field(self) -> str:
        return f'<input type="hidden" name="csrf" value="{self.csrf}">'

    # ---- pipeline ------------------------------------------------------------------------------

    def pipeline_live(self) -> str:
        rows = []
        for s in view.schemes(self.root):
            state = "running" if s["running"] else (s["outcome"] or "stopped")
            buttons = "".join(
                f'<form method="post" action="/scheme" style="display:inline" '
                f'onsubmit="{_confirm(a + " scheme " + s["scheme"] + "?")}">'
                f'{self.csrf_field()}<input type="hidden" name="name" value="{_e(s["scheme"])}">'
                f'<input type="hidden" name="action" value="{a}">'
                f'<button type="submit" id="{a}-{_e(s["scheme"])}">{a}</button></form>'
                for a in ("start", "abort", "reset")
            )
            last = ", ".join(f"{_e(node)} {_e(st)}" for _, node, st in s["jobs"])
            rows.append(
                f"<tr><td>{_e(s['scheme'])}</td><td>{_e(state)}</td>"
                f"<td>{_e(s['current_node'])}</td><td>{last}</td><td>{buttons}</td></tr>"
            )
        schemes = (
            "<h3>Schemes</h3><table><tr><th>scheme</th><th>state</th><th>current node</th>"
            f"<th>last jobs</th><th></th></tr>{''.join(rows)}</table>"
            if rows
            else ""
        )
        jrows = "".join(
            f'<tr><td><a href="/job?name={_q(j["name"])}">{_e(j["name"])}</a></td>'
            f'<td>{_e(j["type"])}</td><td class="{_e(j["status"])}">{_e(j["status"])}</td>'
            f"<td>{_e(j['alias'])}</td><td>{_age_text(j['age_s'])}</td>"
            f"<td>{len(j['inputs'])} in / {len(j['outputs'])} out</td></tr>"
            for j in view.jobs(self.root)
        )
        return (
            f"{schemes}<h3>Jobs</h3><table><tr><th>job</th><th>type</th><th>status</th>"
            f"<th>alias</th><th>last log</th><th>nodes</th></tr>{jrows}</table>"
        )

    def job_live(self, name: str) -> str:
        d = view.job_dir(self.root, name)
        info = next((j for j in view.jobs(self.root) if j["name"] == name), None)
        head = ""
        if info:
            ins = "".join(f"<li>{_e(n)}</li>" for n in info["inputs"])
            outs = "".join(f"<li>{_e(n)}</li>" for n in info["outputs"])
            head = (
                f'<p>{_e(info["type"])}: <b class="{_e(info["status"])}">{_e(info["status"])}'
                f"</b></p><p>inputs</p><ul>{ins}</ul><p>outputs</p><ul>{outs}</ul>"
            )
        return (
            f"{head}<h3>run.out</h3><pre>{_e(view.tail(d / 'run.out'))}</pre>"
            f"<h3>run.err</h3><pre>{_e(view.tail(d / 'run.err'))}</pre>"
        )

    # ---- micrographs ---------------------------------------------------------------------------

    def micrographs_live(self) -> str:
        t = view.micrographs(self.root)
        if not len(t):
            return "<p>No CTF estimation yet.</p>"
        x = np.arange(1, len(t) + 1)
        threshold = view.ctf_threshold(self.root)
        plots = [
            render.line_plot_svg(x, {"defocus (A)": t["defocus"].to_numpy(float)},
                                 title="Defocus", xlabel="micrograph"),
            render.line_plot_svg(x, {"astigmatism (A)": t["astigmatism"].to_numpy(float)},
                                 title="Astigmatism", xlabel="micrograph"),
            render.line_plot_svg(x, {"CTF max resolution (A)": t["max_resolution"].to_numpy(float)},
                                 title="CTF max resolution", xlabel="micrograph",
                                 hlines={"selection": threshold} if threshold else None),
            render.line_plot_svg(x, {"picks": t["picks"].to_numpy(float)},
                                 title="Picks per micrograph", xlabel="micrograph"),
        ]  # fmt: skip
        if "motion" in t:
            plots.insert(0, render.line_plot_svg(x, {"motion (px)": t["motion"].to_numpy(float)},
                                                 title="Accumulated motion", xlabel="micrograph"))  # fmt: skip
        shown = t.iloc[::-1].iloc[:TABLE_ROWS]  # the newest first; plots hold them all
        rows = "".join(
            f'<tr><td>{i + 1}</td><td><a href="/micrograph?name={_q(r.name)}">{_e(r.name)}</a>'
            f"</td><td>{_fmt(r.defocus, '.0f')}</td><td>{_fmt(r.astigmatism, '.0f')}</td>"
            f"<td>{_fmt(r.max_resolution)}</td><td>{_fmt(r.picks, '.0f')}</td></tr>"
            for i, r in zip(shown.index, shown.itertuples(), strict=True)
        )
        more = f" (the table shows the newest {TABLE_ROWS})" if len(t) > TABLE_ROWS else ""
        return (
            f'<p id="nmics">{len(t)} micrographs{more}</p><div>{"".join(plots)}</div>'
            "<table><tr><th>#</th><th>micrograph</th><th>defocus (A)</th><th>astig. (A)</th>"
            f"<th>CTF max res. (A)</th><th>picks</th></tr>{rows}</table>"
        )

    # ---- 2D ------------------------------------------------------------------------------------

    def class2d_live(self, job: str) -> str:
        ct = view.class2d_classes(self.root, job)
        t = ct.classes.copy()
        t["order"] = t["score"].fillna(-1e9)
        t = t.sort_values(["order", "distribution"], ascending=False)
        tiles = "".join(
            f'<div class="cls{" sel" if r.selected else ""}" data-n="{r.number}" '
            f'id="class-{r.number}" onclick="toggle(this)">'
            f'<img loading="lazy" alt="class {r.number}" '
            f'src="/img/class?job={_q(job)}&n={r.number}&it={ct.iteration}">'
            f"#{r.number} score {_fmt(r.score, '.2f') or '-'}{_network(r.score, r.network)}"
            f" P {_fmt(r.p_good, '.2f') or '-'}"
            f"<br>{r.particles} ptcls, {_fmt(r.resolution)} A"
            f"{_passing(r.passed)}</div>"
            for r in t.itertuples()
        )
        chosen = " ".join(str(n) for n in t.loc[t["selected"] == 1, "number"])
        source = (
            f"selection of {_e(ct.selection_job)} framed"
            if ct.selection_job
            else "no Select job yet"
        )
        its = sorted((self.root / job).glob("run_it*_model.star"))
        plot = ""
        if len(its) > 1:
            plot = _convergence_svg(its)
        return (
            f"<p>{_e(job)} iteration {ct.iteration}; {source}. Click classes to change the "
            f'selection (<span id="nsel">{int(t["selected"].sum())}</span> chosen).</p>'
            f'<form method="post" action="/class2d/select" id="selform">{self.csrf_field()}'
            f'<input type="hidden" name="optimiser" value="{_e(ct.optimiser)}">'
            f'<input type="hidden" name="job" value="{_e(job)}">'
            f'<input type="hidden" name="classes" id="classes" value="{chosen}">'
            '<button type="submit" id="save">Save as a new Select job</button></form>'
            f'<div class="gallery">{tiles}</div>{plot}'
        )

    # ---- 3D ------------------------------------------------------------------------------------

    def map_live(self) -> str:
        m = view.newest_map(self.root)
        if m is None:
            return "<p>No refined map yet.</p>"
        inv = m["inverse_resolution"]
        plot = ""
        if len(inv) and m["curves"]:
            plot = render.line_plot_svg(
                inv, m["curves"], title="FSC", xlabel="1/resolution (1/A)",
                hlines={"0.143": 0.143}, width=640, height=260,
            )  # fmt: skip
        bfactor = f", B-factor {m['bfactor']:.0f} A^2" if m["bfactor"] else ""
        return (
            f"<p>{_e(m['job'])}: {m['resolution']:.2f} A (FSC 0.143){bfactor}</p>"
            f'<img alt="central slices" src="/img/slices?job={_q(m["job"])}&t={int(m["map"].stat().st_mtime)}">'
            f"<div>{plot}</div>"
        )


def _etag(text: str) -> str:
    return '"' + hashlib.sha1(text.encode()).hexdigest()[:20] + '"'


def _age_text(s: float) -> str:
    if not np.isfinite(s):
        return ""
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _convergence_svg(models: list[Path], top: int = 6) -> str:
    """Resolution per iteration, and the class distribution per iteration of the ``top``
    classes largest at the last one."""
    its, res, dist = [], [], []
    for m in models[-200:]:
        b = view.cached_star(m)
        its.append(int(m.name[6:9]))
        res.append(float(b["model_general"].get("rlnCurrentResolution", np.nan)))
        dist.append(b["model_classes"]["rlnClassDistribution"].astype(float).to_numpy())
    x = np.asarray(its, float)
    k = min(len(d) for d in dist)
    fractions = np.stack([d[:k] for d in dist])  # (iterations, K)
    largest = np.argsort(fractions[-1])[::-1][:top]
    return render.line_plot_svg(
        x, {"resolution (A)": np.asarray(res)}, title="Resolution per iteration", xlabel="iteration"
    ) + render.line_plot_svg(
        x, {f"class {c + 1}": fractions[:, c] for c in largest},
        title=f"Class distribution (the {len(largest)} largest classes)", xlabel="iteration",
    )  # fmt: skip


def create_app(project: str | Path, *, token: str | None = None, poll_ms: int = 3000) -> Starlette:
    """The monitor for ``project``; ``token``: required on every request when given."""
    root = view.check_project(project)
    mon = _Monitor(root, token, poll_ms)

    def live_response(request: Request, text: str) -> Response:
        tag = _etag(text)
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={"ETag": tag})
        return HTMLResponse(text, headers={"ETag": tag, "Cache-Control": "no-cache"})

    def guarded(fn):
        """Token check, then the handler; a user-facing error is a page, not a traceback."""

        async def endpoint(request: Request) -> Response:
            if mon.token is not None:
                given = (
                    request.query_params.get("token")
                    or request.headers.get("x-tamis-token")
                    or request.cookies.get("tamis_token")
                )
                if not given:
                    return PlainTextResponse("token required: open the URL printed at start", 401)
                if not secrets.compare_digest(given, mon.token):
                    return PlainTextResponse("wrong token", 403)
            try:
                response = await fn(request)
            except _Forbidden as exc:
                return PlainTextResponse(str(exc), 403)
            except view.PathOutsideProject as exc:
                return PlainTextResponse(str(exc), 404)
            except TamisError as exc:
                return PlainTextResponse(f"error: {exc}", 400)
            if mon.token is not None and request.query_params.get("token"):
                response.set_cookie("tamis_token", mon.token, httponly=True, samesite="strict")
            return response

        return endpoint

    def sync(fn):
        async def run(request: Request) -> Response:
            return await run_in_threadpool(fn, request)

        return guarded(run)

    async def read_form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        origin = request.headers.get("origin")
        if origin and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise _Forbidden("cross-origin request refused")
        if not secrets.compare_digest(form.get("csrf", ""), mon.csrf):
            raise _Forbidden("missing or stale form token: reload the page")
        return form

    # pages
    def pipeline(request: Request) -> Response:
        msg = request.query_params.get("msg", "")
        note = f'<p class="msg" id="msg">{_e(msg)}</p>' if msg else ""
        return mon.page("Pipeline", "pipeline", note, mon.pipeline_live(), "/live/pipeline")

    def job(request: Request) -> Response:
        name = request.query_params.get("name", "")
        live = mon.job_live(name)
        return mon.page(name, "pipeline", "", live, f"/live/job?name={_q(name)}")

    def micrographs(request: Request) -> Response:
        return mon.page(
            "Micrographs", "micrographs", "", mon.micrographs_live(), "/live/micrographs"
        )

    def micrograph(request: Request) -> Response:
        name = request.query_params.get("name", "")
        view.inside(root, name)
        body = f'<img alt="micrograph" src="/img/micrograph?name={_q(name)}">'
        fit = view.ctf_of(root, name)
        if fit is not None:
            body += (
                f"<p>defocus {fit['defocus_u']:.0f} / {fit['defocus_v']:.0f} A, angle "
                f"{fit['defocus_angle']:.0f} deg, CTF max resolution {_fmt(fit['max_resolution'])}"
                " A</p>"
            )
            if fit["spectrum"] is not None:
                body += (
                    f'<p><img alt="power spectrum" src="/img/ctf?name={_q(name)}"><br>'
                    "amplitude spectrum (left) and the fitted |CTF| (right)</p>"
                )
        shifts, movie_log = view.motion_files(root, name)
        if shifts is not None:
            body += (
                f'<p><img alt="motion" src="/file?path={_q(shifts)}"><br>motion correction: the '
                "global track and the local model's residual tracks"
                + (f' (<a href="/file?path={_q(movie_log)}">log</a>)' if movie_log else "")
                + "</p>"
            )
        return mon.page(name, "micrographs", body)

    def class2d(request: Request) -> Response:
        jobs_ = view.class2d_jobs(root)
        if not jobs_:
            return mon.page("2D classes", "class2d", "<p>No 2D classification yet.</p>")
        job_ = request.query_params.get("job") or jobs_[0]
        links = " ".join(
            f'<a href="/class2d?job={_q(j)}">{"<b>" + _e(j) + "</b>" if j == job_ else _e(j)}</a>'
            for j in jobs_
        )
        msg = request.query_params.get("msg", "")
        note = f'<p class="msg" id="msg">{_e(msg)}</p>' if msg else ""
        return mon.page(
            "2D classes", "class2d", f"<p>{links}</p>{note}", mon.class2d_live(job_),
            f"/live/class2d?job={_q(job_)}", _CLASS_SCRIPT,
        )  # fmt: skip

    def map_page(request: Request) -> Response:
        return mon.page("3D map", "map", "", mon.map_live(), "/live/map")

    # live fragments
    def live(request: Request) -> Response:
        which = request.path_params["which"]
        q = request.query_params
        makers = {
            "pipeline": mon.pipeline_live,
            "job": lambda: mon.job_live(q.get("name", "")),
            "micrographs": mon.micrographs_live,
            "class2d": lambda: mon.class2d_live(q.get("job", "")),
            "map": mon.map_live,
        }
        if which not in makers:
            return PlainTextResponse("no such page", 404)
        return live_response(request, makers[which]())

    # images and files
    def img(request: Request) -> Response:
        which, q = request.path_params["which"], request.query_params
        if which == "class":
            ct = view.class2d_classes(root, q.get("job", ""))
            n = int(q.get("n", "0"))
            if not 1 <= n <= len(ct.classes):
                raise view.PathOutsideProject(f"no class {n}")
            stack = view.inside(root, str(ct.stack.relative_to(root)))
            png = mon.pngs.get(("class", n), stack, lambda: render.class_png(stack, n))
        elif which == "micrograph":
            name = q.get("name", "")
            path = view.inside(root, name)
            picks = view.picks_of(root, name)
            png = mon.pngs.get(
                ("mic", len(picks)),
                path,
                lambda: render.micrograph_png(path, picks, PICK_CIRCLE_PX),
            )
        elif which == "ctf":
            fit = view.ctf_of(root, q.get("name", ""))
            if fit is None or fit["spectrum"] is None:
                raise view.PathOutsideProject("no CTF spectrum for this micrograph")
            spectrum = fit["spectrum"]
            png = mon.pngs.get(("ctf",), spectrum, lambda: render.ctf_png(spectrum, fit))
        elif which == "slices":
            m = view.newest_map(root)
            if m is None:
                raise view.PathOutsideProject("no map")
            path = view.inside(root, str(m["map"].relative_to(root)))
            png = mon.pngs.get(("slices",), path, lambda: render.slices_png(path))
        else:
            return PlainTextResponse("no such image", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    def file(request: Request) -> Response:
        path = view.inside(root, request.query_params.get("path", ""))
        if path.suffix in (".out", ".err", ".txt", ".star", ".log", ".csv", ".py", ".json"):
            return PlainTextResponse(view.tail(path, lines=10_000, max_bytes=4_000_000))
        media = "image/png" if path.suffix == ".png" else "application/octet-stream"
        return Response(path.read_bytes(), media_type=media)

    # actions
    async def scheme(request: Request) -> Response:
        form = await read_form(request)
        name, action = form.get("name", ""), form.get("action", "")
        try:
            done = await run_in_threadpool(actions.scheme_action, root, name, action)
        except TamisError as exc:
            done = f"not done: {exc}"
        actions.log_action(root, request.client.host if request.client else "?", done)
        return RedirectResponse(f"/?msg={_q(done)}", status_code=303)

    async def select(request: Request) -> Response:
        form = await read_form(request)
        classes = [int(c) for c in form.get("classes", "").split() if c.isdigit()]
        job_ = form.get("job", "")
        try:
            name = await run_in_threadpool(
                actions.save_selection, root, form.get("optimiser", ""), classes
            )
            done = f"saved classes {' '.join(map(str, classes))} of {job_} as {name}"
        except TamisError as exc:
            done = f"not saved: {exc}"
        actions.log_action(root, request.client.host if request.client else "?", done)
        return RedirectResponse(f"/class2d?job={_q(job_)}&msg={_q(done)}", status_code=303)

    routes = [
        Route("/", sync(pipeline)),
        Route("/job", sync(job)),
        Route("/micrographs", sync(micrographs)),
        Route("/micrograph", sync(micrograph)),
        Route("/class2d", sync(class2d)),
        Route("/map", sync(map_page)),
        Route("/live/{which}", sync(live)),
        Route("/img/{which}", sync(img)),
        Route("/file", sync(file)),
        Route("/scheme", guarded(scheme), methods=["POST"]),
        Route("/class2d/select", guarded(select), methods=["POST"]),
    ]
    return Starlette(routes=routes)


class _Forbidden(Exception):
    pass
