"""Labelled grids (sd_dmd.outputs.sample.labelled_grid): the demo grid, validation grids and final/samples.png name
each row and column, and small images are enlarged with nearest-neighbour to cells of at least 96 px."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_dmd.outputs.sample import labelled_grid

ROOT = Path(__file__).resolve().parents[1]
WHITE = 255


def _images(n_rows, n_cols, side, seed=0):
    """Random images whose pixel (0, 0) is a marker colour found nowhere else (channel 0 of the rest is < 200;
    label ink is grey, the background white)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        row = []
        for c in range(n_cols):
            a = rng.integers(0, 200, (side, side, 3), dtype=np.uint8)
            a[0, 0] = (250, 10 * r + c, 7)
            row.append(Image.fromarray(a))
        rows.append(row)
    return rows


def _cell_origin(grid: np.ndarray, r: int, c: int) -> tuple[int, int]:
    ys, xs = np.nonzero(np.all(grid == (250, 10 * r + c, 7), axis=-1))
    assert len(ys), f"cell ({r}, {c}) not found"
    return int(ys.min()), int(xs.min())


def _ink(region: np.ndarray) -> int:
    """Pixels darker than the white background (label text is drawn in near-black)."""
    return int((region.min(axis=-1) < 160).sum())


@pytest.mark.parametrize("side, factor", [(8, 12), (32, 3)])
def test_cells_are_nearest_neighbour_copies_of_at_least_96_px_in_the_given_order(side, factor):
    rows = _images(2, 3, side)
    grid = np.asarray(labelled_grid(rows, ["seed 0 · student · 1 step", "seed 1 · student · 1 step"],
                                    ["a red cube", "a blue sphere", "a green cone"]))
    cell = side * factor
    assert cell == 96
    origins = {}
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = origins[r, c] = _cell_origin(grid, r, c)
            src = np.asarray(im)
            # every cell pixel is a copy of its source pixel: (i, j) -> source (i // factor, j // factor)
            expect = src.repeat(factor, axis=0).repeat(factor, axis=1)
            np.testing.assert_array_equal(grid[y:y + cell, x:x + cell], expect)
    # rows top to bottom and columns left to right in the order given, aligned
    for r in range(2):
        assert origins[r, 0][1] < origins[r, 1][1] < origins[r, 2][1]
        assert origins[r, 0][0] == origins[r, 1][0] == origins[r, 2][0]
        assert origins[r, 1][1] - origins[r, 0][1] >= cell
    for c in range(3):
        assert origins[0, c][0] + cell <= origins[1, c][0] and origins[0, c][1] == origins[1, c][1]


def test_grid_size_follows_the_cell_size():
    labels = (["seed 0 · student · 1 step", "seed 1 · student · 1 step"], ["a red cube", "a blue sphere", "cone"])
    small, mid = (labelled_grid(_images(2, 3, s), *labels) for s in (8, 32))
    assert small.size == mid.size  # both 96 px cells: x12 and x3
    assert small.width >= 3 * 96 + 100 and small.height >= 2 * 96 + 20  # cells plus the label bands
    big = labelled_grid(_images(2, 3, 200), *labels)  # already over 96 px: left as it is
    assert big.width - small.width >= 3 * (200 - 96) and big.height - small.height >= 2 * (200 - 96)
    assert labelled_grid(_images(2, 3, 8), *labels, min_cell=160).width >= 3 * 160  # 8 px x20


def test_labels_are_drawn_beside_their_row_and_above_their_column():
    rows = _images(2, 3, 16)
    g = labelled_grid(rows, ["seed 0 · student · 1 step", ""], ["zero", "", "a blue sphere"])
    grid = np.asarray(g)
    assert tuple(grid[0, 0]) == (WHITE,) * 3  # white background
    (y0, x0), (y1, _), cell = _cell_origin(grid, 0, 0), _cell_origin(grid, 1, 0), 96
    # the row label band, left of the cells: ink beside row 0 (labelled), none beside row 1 (empty label)
    assert _ink(grid[y0:y0 + cell, :x0]) > 50
    assert _ink(grid[y1:y1 + cell, :x0]) == 0
    # the column label band, above the cells: ink above columns 0 and 2, none above column 1
    xs = [_cell_origin(grid, 0, c)[1] for c in range(3)]
    assert _ink(grid[:y0, xs[0]:xs[0] + cell]) > 20
    assert _ink(grid[:y0, xs[1]:xs[1] + cell]) == 0
    assert _ink(grid[:y0, xs[2]:xs[2] + cell]) > 50
    # a label too long for its cell is wrapped and cut: nothing is drawn past the grid's right edge
    long = labelled_grid(rows, ["seed 0 · student · 1 step", ""], ["x", "y", "a very long prompt " * 10])
    a = np.asarray(long)
    assert _ink(a[:, -4:]) == 0 and long.width == g.width


def test_shared_prompt_words_go_to_the_corner_once():
    """'a handwritten digit zero', '... one': the columns say 'zero', 'one' and the corner the shared words."""
    prompts = ["a handwritten digit zero", "a handwritten digit one"]
    rows = _images(1, 2, 32)
    g = np.asarray(labelled_grid(rows, ["seed 0 · student · 1 step"], prompts))
    y0, x0 = _cell_origin(g, 0, 0)
    assert _ink(g[:y0, :x0]) > 50  # the corner holds "a handwritten digit …"
    plain = np.asarray(labelled_grid(rows, ["seed 0 · student · 1 step"], ["zero", "one"]))
    yp, xp = _cell_origin(plain, 0, 0)
    assert _ink(plain[:yp, :xp]) == 0
    # the column labels themselves are the last words alone: the same pixels as columns labelled "zero", "one"
    assert y0 == yp
    x1, xp1 = _cell_origin(g, 0, 1)[1], _cell_origin(plain, 0, 1)[1]
    np.testing.assert_array_equal(g[:y0, x0:x1 + 96], plain[:yp, xp:xp1 + 96])


def test_save_grid_labels_the_digit_tensors(tmp_path):
    from sd_dmd.evaluation.digits.sampling import save_grid

    images = torch.rand(6, 3, 32, 32) * 2 - 1
    save_grid(images, tmp_path / "g.png", nrow=3, row_labels=["teacher · 50 steps · CFG 1.75", "student · 1 step"],
              col_labels=["0", "1", "2"])
    g = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert g.shape[1] >= 3 * 96 + 100 and g.shape[0] >= 2 * 96 + 20
    first = ((images[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    cell = first.repeat(3, axis=0).repeat(3, axis=1)
    hits = [(y, x) for y, x in zip(*np.nonzero(np.all(g == first[0, 0], axis=-1)))
            if np.array_equal(g[y:y + 96, x:x + 96], cell)]
    assert hits, "first image not found as a x3 nearest-neighbour cell"
    y, x = hits[0]
    assert _ink(g[y:y + 96, :x]) > 50 and _ink(g[:y, x:x + 96]) > 5  # its row and column labels


def test_demo_grid_rows_name_model_steps_and_the_measured_ms(tmp_path, monkeypatch):
    """comparison_grid labels its rows (teacher and student in pairs) with the ms/image it is given and its columns
    with the digits; sampling is replaced by random images (the real run takes minutes)."""
    import sd_dmd.demo as demo
    import sd_dmd.outputs.sample as sample

    def fake(lora, n, seed, teacher_steps=None):
        return torch.rand(10 * n, 3, 32, 32) * 2 - 1, torch.arange(10).repeat_interleave(n), {"ms_per_image": 9.0}

    seen = {}

    def spy(rows, row_labels, col_labels=None, **kw):
        seen.update(rows=rows, row_labels=row_labels, col_labels=col_labels)
        return labelled_grid(rows, row_labels, col_labels, **kw)

    monkeypatch.setattr(demo, "evaluate_lora", fake)
    monkeypatch.setattr(sample, "labelled_grid", spy)
    demo.comparison_grid(Path("lora"), tmp_path / "grid.png", n_rows=2, ms={"teacher": 41.27, "student": 1.934})
    g = demo.shipped_guidance()
    assert seen["row_labels"] == [f"teacher · 50 steps · CFG {g:g}\n41.3 ms/image", "student · 1 step\n1.9 ms/image"] * 2
    assert seen["col_labels"] == [str(d) for d in range(10)]
    assert [len(r) for r in seen["rows"]] == [10] * 4
    w, h = Image.open(tmp_path / "grid.png").size
    assert w >= 10 * 96 + 100 and h >= 4 * 96 + 20
    demo.comparison_grid(Path("lora"), tmp_path / "grid2.png", n_rows=1)  # no ms given: what its sampling took
    assert seen["row_labels"] == [f"teacher · 50 steps · CFG {g:g}\n9.0 ms/image", "student · 1 step\n9.0 ms/image"]


def test_validation_grid_and_final_samples_of_a_tiny_run_have_label_bands(train_setup, tmp_path):
    from sd_dmd.config import load_config
    from sd_dmd.training.config import Config
    from sd_dmd.training.loop import train

    s = train_setup
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained_model_name_or_path", s["pipe"],
            "--regression.pairs_dir", s["pairs"], "--data.prompts", s["prompts"], "--output_dir", str(tmp_path / "run"),
            "--train.max_steps", "2", "--logging.validation_every", "2"]
    train(load_config(Config, argv)[0])
    run = tmp_path / "run"
    final = run / "validation" / "final.png"
    assert (run / "validation" / "step-000002.png").is_file()
    assert (run / "final" / "samples.png").read_bytes() == final.read_bytes()
    g = np.asarray(Image.open(final).convert("RGB"))
    h, w = g.shape[:2]
    # tiny.yaml: 2 prompts x 1 seed of 16 px images -> two 96 px cells (x6) at the bottom right, bands left and top
    assert w >= 2 * 96 + 100 and h >= 96 + 20
    left, top = w - 2 * 96 - 20, h - 96 - 20  # left of / above the cells, whatever the margins
    assert _ink(g[h - 96:, :left]) > 50, "no row label ('seed 0 · student · 1 step')"
    assert _ink(g[:top, w - 2 * 96:]) > 50, "no column labels (the prompts)"
    assert _ink(g[:top, :left]) == 0  # the corner: the two prompts share no words
