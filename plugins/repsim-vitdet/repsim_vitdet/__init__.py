"""repsim plugin: ViTDet-style Mask R-CNN transfer of ViTs to COCO-format detection."""
