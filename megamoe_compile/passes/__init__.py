"""Graph passes. `fuse_moe_layers` rewrites prepared DeepSeek-V4 MoE layers into `megamoe.fused_moe`."""

from .fuse_moe import LayerFusion, fuse_moe_layers, prepared_blocks, remove_markers, unprepared_moe_blocks

__all__ = ["LayerFusion", "fuse_moe_layers", "prepared_blocks", "remove_markers", "unprepared_moe_blocks"]
