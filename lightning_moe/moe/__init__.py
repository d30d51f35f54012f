"""Mixture-of-experts blocks inserted into the MLP slots of a HuggingFace decoder.

routers/ (one file per router, base.py the interface), experts.py (expert forms), dispatch.py (grouped GEMMs over
the selected slots), layer.py (the MoE block), routing.py (the routing state the blocks share and the records
they leave), losses.py (balancing, z, domain losses) and metrics.py (routing metrics for logs and summaries).
"""
