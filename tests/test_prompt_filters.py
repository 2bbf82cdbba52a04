"""Prompt filters are never silently off; captions are cleaned as LAION's tooling does."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sd_dmd.errors import PromptError
from sd_dmd.data.prompts import PromptFilter, read_prompts

CAPS = ["a red cube", "a blue sphere", "a cat", "a dog"]


@pytest.mark.parametrize("aes_col, unsafe_col, wm_col", [
    ("aesthetic", "pUnsafe", "pWatermark"),
    ("aesthetic_score", "PUNSAFE", "PWATERMARK"),
    ("Aesthetic_Score", "punsafe", "pwatermark"),
])
def test_filter_columns_matched_whatever_the_spelling(tmp_path, aes_col, unsafe_col, wm_col):
    pq.write_table(pa.table({"TEXT": CAPS, aes_col: [7.0, 5.0, 7.0, 7.0], unsafe_col: [0.0, 0.0, 0.9, 0.0],
                             wm_col: [0.0, 0.0, 0.0, 0.95]}), tmp_path / "l.parquet")
    prompts, stats = read_prompts([str(tmp_path / "l.parquet")], filters=PromptFilter(
        min_aesthetic=6.25, max_punsafe=0.5, max_pwatermark=0.8))
    assert prompts == ["a red cube"]
    assert stats.skipped == {"aesthetic below minimum": 1, "punsafe above maximum": 1, "pwatermark above maximum": 1}
    assert "skipped: none" not in stats.summary()


def test_jsonl_filter_columns_any_case(tmp_path):
    rows = [{"caption": c, "Aesthetic": a, "pUnsafe": 0.0} for c, a in zip(CAPS, [7, 5, 7, 5])]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prompts, _ = read_prompts(str(tmp_path / "l.jsonl"), filters=PromptFilter(min_aesthetic=6.25, max_punsafe=0.5))
    assert prompts == ["a red cube", "a cat"]


@pytest.mark.parametrize("name", ["min_aesthetic", "max_punsafe", "max_pwatermark"])
def test_filter_without_its_column_is_an_error(tmp_path, name):
    pq.write_table(pa.table({"TEXT": CAPS, "similarity": [0.3] * 4}), tmp_path / "l.parquet")
    with pytest.raises(PromptError, match=rf"l\.parquet: {name} needs a column .*columns present: \['TEXT', "
                                          r"'similarity'\]"):
        read_prompts(str(tmp_path / "l.parquet"), filters=PromptFilter(**{name: 0.5}))


def test_filter_on_plain_text_is_an_error(tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n")
    with pytest.raises(PromptError, match=r"p\.txt: min_aesthetic needs a column .*columns present: none"):
        read_prompts(str(tmp_path / "p.txt"), filters=PromptFilter(min_aesthetic=6.25))
    assert read_prompts(str(tmp_path / "p.txt"))[0] == ["a red cube"]  # no filter, no column needed


def test_html_entities_unescaped_and_zero_width_captions_skipped(tmp_path):
    caps = ["Tom &amp; Jerry &quot;classic&quot;", "\u200b", "\ufeff\u2060 \u200c", "&#8203;", "caf&eacute; &lt;3",
            "\u200ba dog\u200d", "   ", "&nbsp;"]
    pq.write_table(pa.table({"TEXT": caps}), tmp_path / "l.parquet")
    prompts, stats = read_prompts(str(tmp_path / "l.parquet"))
    assert prompts == ['Tom & Jerry "classic"', "café <3", "a dog"]
    assert stats.skipped == {"empty": 1, "empty after removing zero-width characters / HTML entities": 4}
    assert stats.read == 8 and stats.kept == 3
