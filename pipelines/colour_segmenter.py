"""Weight-free foreground by colour clusters: the "colour" segmenter backend.

Why it exists: the offline demo has no SAM checkpoint, and the "grabcut" backend (a centred
rectangle as its only prior) fails on the toy diffusion model's blurry samples, often returning
an empty mask; bad generation masks then wreck FB-Mem's region scores. The toy world's images
(one coloured shape on a two-colour pattern, see jobs/toy/corpus.py) are far better described by
their colours than by a rectangle.

The rule (`colour_foreground`), the SAM rule's idea applied to colours instead of proposals:

  1. Smooth lightly with an edge-preserving bilateral filter: it removes the samples' speckle
     without smearing edges into blend colours (a Gaussian blur made every edge a thin cluster of
     its own and cost ~0.07 IoU on sharp images).
  2. Cluster pixel colours in CIE Lab with k-means (scikit-learn, seeded, `n_clusters` 4).
  3. Decide per COLOUR CLUSTER, not per connected piece, which clusters are background:
     a. a cluster covering more than `border_touch_frac` of the image's one-pixel frame
        (`border_coverage`, the SAM rule's measure), or whose colour (within
        `FRAME_COLOUR_DIST` in Lab) shows on more than that fraction of the frame, whichever
        cluster k-means put those frame pixels in: backgrounds run along the frame, objects
        sit inside it. Deciding per cluster is what lets a dot that happens not to touch the
        frame still count as background: its colour does touch it elsewhere.
     b. a "pattern": a cluster that spans at least `PATTERN_SPAN` of the frame in both
        directions in scattered pieces (its largest piece holds less than `PATTERN_MAX_SHARE`
        of it). Needed because some dot patterns never touch the frame at all (their dots sit
        inside each period). An object is one compact piece; the toy world's largest spans
        0.72 of the side.
     c. a "transition": blend pixels where a blurred pattern's two colours meet (a blurred
        stripe edge) form clusters of their own that barely touch the frame. A cluster whose
        colour lies within `TRANSITION_LAB_DIST` of the Lab segment between two background
        clusters' colours, with most of its pixels within `TRANSITION_RADIUS` pixels of both,
        is background. (An object's own edge blends with ONE background colour, not two.)
  4. Foreground = union of the other clusters, cleaned: an opening with a 3x3 cross (thin
     blend lines along background edges), then pieces smaller than `min_area_frac` of the frame
     or than `KEEP_REL` of the largest piece are dropped. Holes are never filled: a ring's hole
     shows the background's colour, so it stays background.
  5. Refine with OpenCV GrabCut initialised from that mask (GC_INIT_WITH_MASK): the eroded mask
     is sure foreground, pixels more than `REFINE_BAND` pixels outside it (and background frame
     pixels) sure background, the band between "probable". GrabCut fixes the edges, and the dark
     side of a shaded object that k-means had lumped with a dark background; the sure-background
     beyond the band stops it from bleeding into a similar-coloured background, which an
     unbounded refinement did on the blurry samples.

Known limits: an object whose colour also occurs along the frame (the same colour as the
background, or the object cut by the frame) is lost, and the mask is empty, which FB-Mem scores
on the full image (the conservative outcome, as for SAM). A part of an object with a background
colour is lost the same way (a striped cyan object's dark stripes on a teal background; a dark
shaded blue on navy, though GrabCut recovers some). Rarely, a blurred low-contrast noise
background with one colour in a blob inside the frame has that blob taken for foreground. Choices measured on the demo world's
training images, blurred copies of them, and the toy model's VM/FM samples.
"""
from __future__ import annotations

import numpy as np

from fbmem.jobs.config import SegmenterConfig
from fbmem.pipelines.masks import border_coverage

BILATERAL_D = 7  # filter diameter (pixels); about 2 x 1.5 sigma each side
BILATERAL_SIGMA_COLOR = 30.0  # RGB units: speckle is smoothed, a real colour edge is not
BILATERAL_SIGMA_SPACE = 1.5
KMEANS_N_INIT = 4
MAX_FIT_PIXELS = 16384  # k-means centres are fitted on at most this many pixels
PATTERN_SPAN = 0.75  # fraction of the frame's width AND height a pattern cluster spans
PATTERN_MAX_SHARE = 0.6  # ... while its largest piece holds less than this of its pixels
FRAME_COLOUR_DIST = 10.0  # Lab distance within which a frame pixel "shows" a cluster's colour
TRANSITION_LAB_DIST = 10.0  # Lab distance from the segment between two background colours
TRANSITION_RADIUS = 2  # pixels: a blend pixel lies this close to both colours it blends
TRANSITION_NEAR_FRAC = 0.5  # ... for at least this fraction of a blend cluster's pixels
KEEP_REL = 0.2  # foreground pieces smaller than this fraction of the largest one are specks
REFINE_BAND = 2  # pixels outside the cluster mask GrabCut may still call foreground
REFINE_ITERATIONS = 3


def check_rgb_image(image: np.ndarray) -> np.ndarray:
    """The image as a C-contiguous uint8 HxWx3 array; ValueError for anything else (a float image
    in [0, 1] cast to uint8 would silently become black)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"colour segmenter needs an RGB HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"colour segmenter needs a uint8 image (0..255), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def smooth_image(arr: np.ndarray) -> np.ndarray:
    """Edge-preserving smoothing (bilateral): speckle goes, edges stay sharp."""
    import cv2

    return cv2.bilateralFilter(arr, BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)


def lab_image(arr: np.ndarray) -> np.ndarray:
    """float32 HxWx3 CIE Lab (L 0..100)."""
    import cv2

    return cv2.cvtColor(arr.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def cluster_colours(lab_img: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int HxW k-means cluster label of every pixel, float k x 3 mean Lab colour of each
    cluster), clustered in CIE Lab (distances there follow perceived colour difference). Fewer clusters when the image has fewer distinct colours; on a
    large image the centres are fitted on a seeded sample of `MAX_FIT_PIXELS` pixels, then every
    pixel is assigned to its nearest centre."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    h, w = lab_img.shape[:2]
    lab = lab_img.reshape(-1, 3)
    fit = np.arange(h * w)
    if h * w > MAX_FIT_PIXELS:
        fit = np.sort(np.random.default_rng(seed).choice(h * w, MAX_FIT_PIXELS, replace=False))
    k = max(1, min(n_clusters, len(np.unique(lab[fit], axis=0))))
    if k == 1:
        return np.zeros((h, w), dtype=np.int64), lab.mean(axis=0, keepdims=True)
    # One thread: a few thousand pixels gain nothing from more, and on a busy machine (or next to
    # other Ray actors) OpenMP threads made each call ~30x slower.
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed).fit(lab[fit])
        labels = km.labels_ if len(fit) == h * w else km.predict(lab)
    labels = labels.astype(np.int64)
    counts = np.maximum(np.bincount(labels, minlength=k), 1)[:, None]
    centres = np.stack([np.bincount(labels, weights=lab[:, i], minlength=k) for i in range(3)], 1) / counts
    return labels.reshape(h, w), centres


def _pieces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label image, area of pieces 1..n) of the 8-connected pieces of a boolean mask."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, stats[1:, cv2.CC_STAT_AREA]


def drop_small_pieces(mask: np.ndarray, min_px: float, keep_rel: float = 0.0) -> np.ndarray:
    """Boolean mask without the pieces smaller than `min_px` pixels or than `keep_rel` times the
    largest piece. Holes are left alone (a ring keeps its hole)."""
    labels, areas = _pieces(mask)
    if len(areas) == 0:
        return np.zeros(mask.shape, dtype=bool)
    keep = np.zeros(len(areas) + 1, dtype=bool)
    keep[1:] = (areas >= min_px) & (areas >= keep_rel * areas.max())
    return keep[labels]


def is_pattern(cluster: np.ndarray, min_px: float) -> bool:
    """A cluster that spans most of the frame in scattered pieces (dots, a grid's crossings):
    background even where none of its pieces touches the frame."""
    solid = drop_small_pieces(cluster, min_px)
    if not solid.any():
        return False
    h, w = solid.shape
    ys, xs = np.nonzero(solid)
    span = min((xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)
    _, areas = _pieces(solid)
    return span >= PATTERN_SPAN and areas.max() / areas.sum() < PATTERN_MAX_SHARE


def is_transition(
    cluster: np.ndarray, centre: np.ndarray, a: np.ndarray, ca: np.ndarray, b: np.ndarray, cb: np.ndarray
) -> bool:
    """A cluster of blend pixels between two background clusters `a` and `b` (where a blurred
    pattern's two colours meet): its colour lies near the segment between theirs in Lab, and most
    of its pixels lie within `TRANSITION_RADIUS` pixels of both of them."""
    import cv2

    ab = cb - ca
    t = float(np.clip(np.dot(centre - ca, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    if np.linalg.norm(centre - (ca + t * ab)) > TRANSITION_LAB_DIST:
        return False
    size = 2 * TRANSITION_RADIUS + 1
    kernel = np.ones((size, size), np.uint8)
    near_a = cv2.dilate(a.astype(np.uint8), kernel) > 0
    near_b = cv2.dilate(b.astype(np.uint8), kernel) > 0
    return float((near_a & near_b)[cluster].mean()) >= TRANSITION_NEAR_FRAC


def frame_colour_coverage(lab: np.ndarray, centre: np.ndarray) -> float:
    """Fraction of the frame's pixels whose Lab colour lies within `FRAME_COLOUR_DIST` of
    `centre`: how much of the frame shows this colour, whichever cluster k-means gave it to."""
    h, w = lab.shape[:2]
    frame = np.zeros((h, w), dtype=bool)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
    return float((np.linalg.norm(lab[frame] - centre, axis=1) < FRAME_COLOUR_DIST).mean())


def foreground_clusters(
    labels: np.ndarray, centres: np.ndarray, lab: np.ndarray, *, border_touch_frac: float, min_px: float
) -> list[int]:
    """Clusters that are neither along the frame, nor a frame-spanning pattern, nor blends
    between two background clusters."""
    clusters = {int(c): labels == c for c in np.unique(labels)}
    background = {
        c
        for c, m in clusters.items()
        if max(border_coverage(m), frame_colour_coverage(lab, centres[c])) > border_touch_frac
        or is_pattern(m, min_px)
    }
    changed = True
    while changed:  # a blend may sit between a background cluster and another blend
        changed = False
        for c in sorted(set(clusters) - background):
            pairs = [(a, b) for a in sorted(background) for b in sorted(background) if a < b]
            if any(
                is_transition(clusters[c], centres[c], clusters[a], centres[a], clusters[b], centres[b])
                for a, b in pairs
            ):
                background.add(c)
                changed = True
    return sorted(set(clusters) - background)


def clean_foreground(fg: np.ndarray, min_px: float) -> np.ndarray:
    """Opening with a 3x3 cross (removes one-pixel blend lines and rims), then specks dropped."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    opened = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel) > 0
    return drop_small_pieces(opened, min_px, KEEP_REL)


def refine_with_grabcut(arr: np.ndarray, fg: np.ndarray, seed: int) -> np.ndarray:
    """GrabCut from the cluster mask, allowed to move the edge by at most `REFINE_BAND` pixels
    outward (see the module docstring). `fg` must hold both foreground and background pixels."""
    import cv2

    fg8 = fg.astype(np.uint8)
    square = np.ones((3, 3), np.uint8)
    gc = np.full(fg.shape, cv2.GC_BGD, dtype=np.uint8)
    gc[cv2.dilate(fg8, square, iterations=REFINE_BAND) > 0] = cv2.GC_PR_BGD
    gc[fg] = cv2.GC_PR_FGD
    gc[cv2.erode(fg8, square) > 0] = cv2.GC_FGD
    frame = np.zeros(fg.shape, dtype=bool)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
    gc[frame & ~fg] = cv2.GC_BGD
    cv2.setRNGSeed(seed)  # GrabCut's GMM init uses k-means: fix it for reproducible masks
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(arr[..., ::-1].copy(), gc, None, bgd, fgd, REFINE_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD))


def colour_foreground(
    image: np.ndarray,
    *,
    n_clusters: int = 4,
    border_touch_frac: float = 0.05,
    min_area_frac: float = 0.005,
    refine: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 HxW foreground in {0, 1} (see the module docstring); all zero
    when no colour cluster qualifies. Deterministic for a given seed."""
    arr = check_rgb_image(image)
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2 (a background and an object), got {n_clusters}")
    h, w = arr.shape[:2]
    if h < 3 or w < 3:
        return np.zeros((h, w), dtype=np.float32)  # every pixel is on the frame: no inside
    min_px = min_area_frac * h * w
    lab = lab_image(smooth_image(arr))
    labels, centres = cluster_colours(lab, n_clusters, seed)
    keep = foreground_clusters(labels, centres, lab, border_touch_frac=border_touch_frac, min_px=min_px)
    fg = clean_foreground(np.isin(labels, keep), min_px)
    if refine and fg.any() and not fg.all():
        fg = refine_with_grabcut(arr, fg, seed)
    return fg.astype(np.float32)


class ColourForeground:
    """The "colour" backend: `colour_foreground` with the config's settings."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        self.model_id = cfg.model_id
        self.n_clusters = cfg.colour_clusters
        self.refine = cfg.colour_refine
        self.border_touch_frac = cfg.border_touch_frac
        self.min_area_frac = cfg.min_area_frac
        self.seed = cfg.seed

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return colour_foreground(
            image,
            n_clusters=self.n_clusters,
            border_touch_frac=self.border_touch_frac,
            min_area_frac=self.min_area_frac,
            refine=self.refine,
            seed=self.seed,
        )
