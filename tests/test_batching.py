"""The one padding rule and the one batch chunker."""

import numpy as np

from ferry.batching import joined_rows, padding_mask, right_padded, row_chunks


def test_rows_are_right_padded_with_a_matching_mask():
    rows = [[5, 6, 7], [8], []]
    assert right_padded(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert padding_mask(rows).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert right_padded(rows, -100).dtype == np.int64
    assert right_padded([[]], 3).shape == (1, 1)  # never a zero-width batch


def test_chunks_cover_every_row_once_and_join_back():
    assert [(s.start, s.stop) for s in row_chunks(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert list(row_chunks(0, 3)) == []
    pieces = [np.array([[1, 2, 3]]), np.array([[4], [5]])]
    assert joined_rows(pieces, 9).tolist() == [[1, 2, 3], [4, 9, 9], [5, 9, 9]]
    assert joined_rows([np.array([1.0]), np.array([2.0, 3.0])]).tolist() == [1.0, 2.0, 3.0]
    scores = [np.ones((1, 2, 4)), np.zeros((1, 1, 4))]
    assert joined_rows(scores).shape == (2, 2, 4)
