"""Outlines of a binary mask as closed polylines: the outer edge of each 8-connected component, along pixel
borders, simplified by Douglas-Peucker to a bounded number of points."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MAX_OUTLINE_POINTS = 200
"""Most points of one outline polyline (first = last included)."""

OUTLINE_TOLERANCE_PX = 1.0
"""Douglas-Peucker tolerance of the outlines: no pixel-border corner left out lies farther than this (raised until
a component's polyline has at most MAX_OUTLINE_POINTS points)."""

_TOLERANCE_STEP = 1.25  # how fast the tolerance grows: in small steps, so the outline stays as close as it can


def outline_polylines(mask: np.ndarray, max_points: int = MAX_OUTLINE_POINTS) -> list[np.ndarray]:
    """The outer edge of each 8-connected component of `mask` as a closed polyline: an (N, 2) float array of
    (column, row) points in PIXEL units (origin at the top-left corner of the top-left pixel), first = last.

    The edge runs along pixel borders (a component's holes are filled first), so every vertex is a corner of one of
    its boundary pixels; Douglas-Peucker keeps the corners that matter (tolerance OUTLINE_TOLERANCE_PX, raised in
    steps of 25 % until at most `max_points` points remain). Components come in raster order of their first pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f'Argument "mask" must be 2-D, not of shape {mask.shape}.')
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    polylines = []
    for number, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        component = ndimage.binary_fill_holes(labels[window] == number)
        corners = _trace_outer_edge(component) + np.array([window[1].start, window[0].start])
        ring = _simplify_ring(corners.astype(np.float64), max_points)
        polylines.append(np.vstack([ring, ring[:1]]))
    return polylines


def _trace_outer_edge(component: np.ndarray) -> np.ndarray:
    """The corners (x, y) of the outer edge of one 8-connected component without holes, clockwise on screen (the
    component on the right), starting at the top-left corner of its first pixel; the first is not repeated.

    Every pixel border between the component and the outside is a directed edge, clockwise around its pixel. At a
    corner shared by two diagonal pixels of the component (two edges leave it), the walk turns left, onto the other
    pixel: that is what makes them one 8-connected outline.
    """
    padded = np.pad(component, 1)
    inside = padded[1:-1, 1:-1]
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # (outside neighbour, edge start (dx, dy), edge end (dx, dy)) relative to the pixel's top-left corner
        (padded[:-2, 1:-1], (0, 0), (1, 0)),  # top, heading right
        (padded[1:-1, 2:], (1, 0), (1, 1)),  # right, heading down
        (padded[2:, 1:-1], (1, 1), (0, 1)),  # bottom, heading left
        (padded[1:-1, :-2], (0, 1), (0, 0)),  # left, heading up
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        for row, column in zip(*np.nonzero(inside & ~neighbour), strict=True):
            outgoing.setdefault((int(column) + sx, int(row) + sy), []).append((int(column) + ex, int(row) + ey))

    first_row, first_column = (int(v[0]) for v in np.nonzero(inside))
    start = (first_column, first_row)
    corners = [start]
    previous, current = start, (first_column + 1, first_row)
    outgoing[start].remove(current)
    while current != start:
        heading = (current[0] - previous[0], current[1] - previous[1])
        candidates = outgoing[current]
        left = (current[0] + heading[1], current[1] - heading[0])
        following = left if len(candidates) > 1 and left in candidates else candidates[0]
        candidates.remove(following)
        if (following[0] - current[0], following[1] - current[1]) != heading:
            corners.append(current)  # a corner; points along a straight run are left out
        previous, current = current, following
    return np.array(corners, dtype=np.int64)


def _simplify_ring(ring: np.ndarray, max_points: int) -> np.ndarray:
    """Douglas-Peucker on a closed ring (first not repeated), leaving at most `max_points - 1` points (and never
    fewer than 3, so the polyline stays an area)."""
    tolerance = OUTLINE_TOLERANCE_PX
    simplified = ring
    while True:
        candidate = _douglas_peucker_ring(ring, tolerance)
        if len(candidate) < 3:
            break
        simplified = candidate
        if len(simplified) < max_points:
            break
        tolerance *= _TOLERANCE_STEP
    if len(simplified) >= max_points:  # only where no tolerance gives 3 to max_points - 1 points: evenly spaced
        simplified = simplified[np.linspace(0, len(simplified) - 1, max_points - 1).astype(int)]
    return simplified


def _douglas_peucker_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    if len(ring) <= 3:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    chain = np.vstack([ring, ring[:1]])  # split at the first point and the one farthest from it
    keep = np.zeros(len(chain), dtype=bool)
    keep[[0, far, len(chain) - 1]] = True
    stack = [(0, far), (far, len(chain) - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        distances = _distance_to_segment(chain[i + 1 : j], chain[i], chain[j])
        k = int(np.argmax(distances))
        if distances[k] > tolerance:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return chain[:-1][keep[:-1]]


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = b - a
    length_squared = float(direction @ direction)
    if length_squared == 0.0:
        return np.hypot(*(points - a).T)
    t = np.clip((points - a) @ direction / length_squared, 0.0, 1.0)
    return np.hypot(*(points - (a + t[:, None] * direction)).T)
