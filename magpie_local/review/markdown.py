"""Generated and imported text as safe HTML for the review app: Markdown rendered by markdown-it-py
with raw HTML off (it is shown as text), code blocks highlighted by Pygments, then cleaned by nh3
(the Ammonia sanitizer) to an allow-list of tags and attributes: no script, no event handlers, no
style, no images (nothing is fetched from elsewhere), links only to http, https and mailto."""

from __future__ import annotations

from functools import lru_cache

TAGS = {"p", "br", "hr", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4",
        "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a", "span", "div", "del", "s"}
ATTRIBUTES = {"a": {"href", "title"}, "span": {"class"}, "div": {"class"}, "code": {"class"}, "pre": {"class"},
              "th": {"align"}, "td": {"align"}}
URL_SCHEMES = {"http", "https", "mailto"}
MAX_CHARS = 200_000  # of one text rendered; the rest is counted, not shown


def _highlight(code: str, lang: str, attrs: str) -> str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_by_name(lang.strip().split()[0]) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes it into a plain code block
    return highlight(code, lexer, HtmlFormatter(nowrap=True))  # markdown-it puts it in <pre><code>


@lru_cache(maxsize=1)
def _parser():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight}).enable("table")


def render(text: str) -> str:
    """`text` as sanitized HTML."""
    import nh3

    more = len(text) - MAX_CHARS
    html = _parser().render(text[:MAX_CHARS])
    clean = nh3.clean(html, tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES,
                      link_rel="noopener noreferrer nofollow", strip_comments=True)
    return clean + (f'<p class="more">… {more} more characters</p>' if more > 0 else "")


def code_css() -> str:
    """The stylesheet of the highlighted code blocks (served as a file: the page allows no inline style)."""
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(style="friendly").get_style_defs("pre")
