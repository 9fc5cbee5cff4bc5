"""The paper's analyses of a trained ViT, as arrays (for notebooks), figures and a report.

- ``attention``: per-head attention maps, attention rollout, mean attention distance;
- ``embeddings``: position-embedding similarity, principal components of the patch filters;
- ``figures``: a matplotlib figure for each;
- ``report``: ``analyze(checkpoint, out_dir)`` writes them all as PNGs and ``report.html``.
"""

from vitkit.analysis.attention import (
    attention_maps,
    attention_rollout,
    collect_attentions,
    mean_attention_distance,
    patch_distances,
    rollout_matrix,
)
from vitkit.analysis.embeddings import (
    FilterComponents,
    embedding_filter_components,
    position_embedding_similarity,
)
from vitkit.analysis.report import analyze
from vitkit.analysis.requirements import NotApplicable

__all__ = [
    "FilterComponents",
    "NotApplicable",
    "analyze",
    "attention_maps",
    "attention_rollout",
    "collect_attentions",
    "embedding_filter_components",
    "mean_attention_distance",
    "patch_distances",
    "position_embedding_similarity",
    "rollout_matrix",
]
