"""K-means over semantic-teacher features: fitting (mini-batch), assignment, and the `.safetensors` file.

`assign` is THE assignment rule: `neurocodec kmeans` reports usage with it and semantic families turn
teacher features into training targets with it, so ids always mean the same clusters.

Why our own mini-batch k-means (40 lines of torch) rather than a library: nothing installed does
mini-batch k-means on torch tensors (vector-quantize-pytorch's `kmeans` is full-batch over one tensor in
memory, and scikit-learn's `MiniBatchKMeans` would add a dependency and a numpy round trip for what is
Sculley's update rule: per-centre learning rate 1 / (points the centre has absorbed so far)).

File layout (`save_kmeans`): one tensor `centroids` [clusters, dim] float32; metadata `format`
(`neurocodec.kmeans.v1`), `teacher` (source, or the tiny config), `kind`, `layer`, `frame_rate`, `clusters`,
`dim`, `frames` (fitted on), `inertia` (mean squared distance), `usage`, `seed`, `manifest`. Written
atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError

FORMAT = "neurocodec.kmeans.v1"


def _flat(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """[B, D, T] -> ([B*T, D], (B, T)); [N, D] stays."""
    if features.dim() == 3:
        b, d, t = features.shape
        return features.transpose(1, 2).reshape(b * t, d), (b, t)
    if features.dim() == 2:
        return features, None
    raise ValueError(f"features must be [N, D] or [B, D, T], got {tuple(features.shape)}")


def assign(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Id of the nearest centroid (squared Euclidean) of every frame: [B, D, T] -> [B, T], [N, D] -> [N].

    Computed in float32 at least; ties go to the lower id (argmin), so the result does not depend on
    the batch layout for distinct centroids."""
    x, shape = _flat(features)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, c = x.to(dtype), centroids.to(device=x.device, dtype=dtype)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid
    ids = (c.pow(2).sum(-1) - 2 * x @ c.t()).argmin(-1)
    return ids if shape is None else ids.view(*shape)


def inertia(features: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean squared distance of the frames to their nearest centroid."""
    x, _ = _flat(features)
    x = x.float()
    return float((x - centroids.float()[assign(x, centroids)]).pow(2).sum(-1).mean())


def fit_minibatch_kmeans(frames: torch.Tensor, clusters: int, iters: int = 300, batch_size: int = 4096,
                         seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Centroids [clusters, D] of `frames` [N, D] by mini-batch k-means (Sculley 2010), seeded.

    Init: k-means++ on a random sample of the frames (random seeds alone often put two centres in one
    cluster and none in another, which mini-batch updates never undo). Each step draws `batch_size` frames, assigns them,
    and moves each centre towards the mean of its new points with rate (new points) / (all points it has
    absorbed). A centre that has absorbed nothing after a step is re-seeded on a random frame of the batch
    (no dead clusters)."""
    from tqdm.auto import tqdm

    frames = frames.float()
    n = frames.shape[0]
    if n < clusters:
        raise UserError(f"k-means needs at least as many frames as clusters: {n} frames for {clusters} clusters "
                        f"(use fewer --clusters or more audio)")
    gen = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(frames, clusters, min(n, max(3 * batch_size, 3 * clusters)), gen)
    counts = torch.zeros(clusters)
    batch_size = min(batch_size, n)
    bar = tqdm(range(iters), desc="k-means", unit="step", disable=not progress, leave=False)
    for _ in bar:
        batch = frames[torch.randint(0, n, (batch_size,), generator=gen)]
        ids = assign(batch, centroids)
        new = torch.bincount(ids, minlength=clusters).float()
        sums = torch.zeros_like(centroids).index_add_(0, ids, batch)
        counts += new
        hit = new > 0
        rate = (new[hit] / counts[hit]).unsqueeze(1)
        centroids[hit] += rate * (sums[hit] / new[hit].unsqueeze(1) - centroids[hit])
        dead = (counts == 0).nonzero().flatten()
        if len(dead):
            centroids[dead] = batch[torch.randint(0, batch_size, (len(dead),), generator=gen)]
    return centroids


def kmeans_plus_plus(frames: torch.Tensor, clusters: int, sample: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on `sample` random frames: each next centre is drawn
    with probability proportional to its squared distance from the centres chosen so far."""
    pool = frames[torch.randperm(frames.shape[0], generator=gen)[:sample]]
    chosen = [int(torch.randint(0, pool.shape[0], (1,), generator=gen))]
    nearest = (pool - pool[chosen[0]]).pow(2).sum(-1)
    for _ in range(1, clusters):
        weights = nearest.clamp_min(0)
        if float(weights.sum()) <= 0:  # fewer distinct frames than clusters: any frame will do
            weights = torch.ones_like(weights)
        i = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(i)
        nearest = torch.minimum(nearest, (pool - pool[i]).pow(2).sum(-1))
    return pool[chosen].clone()


def save_kmeans(path: str | Path, centroids: torch.Tensor, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "clusters": str(centroids.shape[0]), "dim": str(centroids.shape[1])}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({"centroids": centroids.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_kmeans(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(centroids [clusters, dim] float32, metadata) of a file written by `neurocodec kmeans`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"k-means file {path} does not exist (fit one with `neurocodec kmeans`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT or "centroids" not in f.keys():
                raise UserError(f"{path}: not a neurocodec k-means file (metadata format={meta.get('format')!r})")
            centroids = f.get_tensor("centroids").float()
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    return centroids, meta


def teacher_frames(teacher, utterances: list, frame_rate: float, max_frames: int | None = None, seed: int = 0,
                   piece_seconds: float = 30.0, progress: bool = True) -> torch.Tensor:
    """Teacher features of every utterance at `frame_rate`, as frames [N, D] (float32).

    Files are read at the teacher's rate and run in pieces of at most `piece_seconds` (attention cost grows
    with length squared). With `max_frames`, each frame is kept with probability max_frames / (frames the
    manifest's durations promise), so memory stays bounded on large corpora."""
    import math

    from tqdm.auto import tqdm

    from ..audio import load_audio
    from ..errors import AudioError

    sr = teacher.config.sample_rate
    expected = sum(math.ceil((u.duration or 0.0) * frame_rate) for u in utterances)
    keep = 1.0 if not max_frames or expected <= max_frames else max_frames / expected
    gen = torch.Generator().manual_seed(seed)
    piece = max(1, int(piece_seconds * sr))
    out, skipped = [], 0
    for u in tqdm(utterances, desc="teacher features", unit="file", disable=not progress, leave=False):
        try:
            wav = load_audio(u.path, sr)
        except AudioError:
            skipped += 1
            continue
        for start in range(0, wav.shape[-1], piece):
            chunk = wav[:, start: start + piece]
            feats = teacher.features(chunk.unsqueeze(0), frame_rate)[0].t().cpu()  # [T, D]
            if keep < 1.0:
                feats = feats[torch.rand(feats.shape[0], generator=gen) < keep]
            out.append(feats)
    if not out:
        raise UserError(f"no readable audio among {len(utterances)} file(s) ({skipped} unreadable)")
    return torch.cat(out)
