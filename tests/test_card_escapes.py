"""Strings from the data reach the card as text: a caption or kept column holding HTML never runs as script,
and `$…$` or a backslash in a caption never reaches matplotlib's mathtext."""
import dataclasses
import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

HOSTILE = '<script>alert("x")</script> <img src=x onerror=alert(1)> $\\frac{a$ | back\\slash'
ODD = "\x00nul\nnew line 🙂"  # a NUL and an emoji: matplotlib warned of glyphs missing from its font


def test_hostile_captions_and_columns_are_escaped_in_the_card(small_run, tmp_path):
    from data_cards.render import CardStage

    work = tmp_path / "w"
    for s in ("download", "embed", "balance", "cluster"):
        shutil.copytree(small_run.stage_dir(s), work / s)
    for p in (work / "download").glob("0*.parquet"):
        t = pq.read_table(p)
        n = t.num_rows
        for col in ("caption", "vendor"):
            i = t.column_names.index(col)
            t = t.set_column(i, col, pa.array([f"{ODD if j % 2 else ''}{HOSTILE} {v}"
                                               for j, v in enumerate(t.column(col).to_pylist())]))
        assert n == t.num_rows
        pq.write_table(t, p)
    cfg = dataclasses.replace(small_run, workdir=str(work), dirs={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = CardStage(cfg, use_ray=False).run(force=True)
    html = (work / "card" / "card.html").read_text()
    md = (work / "card" / "card.md").read_text()
    assert "duplicates.png" in stats["figures"] and "random_clusters.png" in stats["figures"]
    assert "<script>" not in html and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html        # shown as text
    assert "\\<script\\>" in md and "<script>" not in md
    assert html.count("<script") == 0 and html.count("<img ") == len(stats["figures"])
