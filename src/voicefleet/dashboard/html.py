"""HTML built in Python, escaped by construction: every value is escaped unless it is `Html`
(markup this module made). The page shells are `string.Template` files in `templates/`."""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from functools import cache
from importlib import resources
from string import Template


class Html(str):
    """Markup, already escaped."""

    __slots__ = ()


def esc(value: object) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def el(tag: str, *children: object, **attrs: object) -> Html:
    """`<tag attrs>children</tag>`. `class_="x"` -> class, `data_w=3` -> data-w; an attribute
    whose value is None or False is left out, True writes it bare."""
    out = [tag]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-")
        out.append(name if value is True else f'{name}="{esc(value)}"')
    inner = join(children)
    if tag in ("input", "meta", "link", "br"):
        return Html(f"<{' '.join(out)}>")
    return Html(f"<{' '.join(out)}>{inner}</{tag}>")


def table(head: Iterable[str], rows: Iterable[Iterable[object]], **attrs: object) -> Html:
    """A table whose cells carry their column's name (the phone layout shows it as a label)."""
    names = list(head)
    body = [
        el("tr", *(el("td", cell, data_label=n) for n, cell in zip(names, row, strict=True)))
        for row in rows
    ]
    if not body:
        return el("p", "none yet", class_="empty")
    return el(
        "div",
        el("table", el("thead", el("tr", *(el("th", n) for n in names))), el("tbody", *body)),
        class_="table",
        **attrs,
    )


def when(ts: float | None) -> Html:
    """A UTC time, today's as its time of day only."""
    if not ts:
        return esc("-")
    now = time.gmtime()
    then = time.gmtime(ts)
    same_day = then[:3] == now[:3]
    text = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", then)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", then)
    return el("time", text + "Z", datetime=iso, title=iso)


def badge(text: str, kind: str = "") -> Html:
    return el("span", text, class_=f"badge {kind or text}")


@cache
def template(name: str) -> Template:
    source = resources.files(__package__).joinpath("templates", name).read_text("utf-8")
    return Template(source)


def render(name: str, **values: object) -> Html:
    """A page shell with its values escaped (Html values go in as they are)."""
    return Html(template(name).substitute({k: esc(v) for k, v in values.items()}))
