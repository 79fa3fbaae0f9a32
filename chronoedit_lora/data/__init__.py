"""Edit-pair datasets: ``metadata.csv`` parsing, robust image loading, sizing, the torch Dataset, checks."""

from .buckets import CropPlan, SizePolicy, aspect_buckets, bucket_batches, choose_bucket, plan_crop, plan_pair
from .check import check_dataset
from .dataset import EditPairDataset
from .images import PairImages, load_pair, open_image, read_image, read_source_size, read_video_frames, to_rgb
from .metadata import IMAGE_COLUMNS, VIDEO_COLUMNS, EditPair, clean_prompt, read_metadata
from .problems import Problem, format_report, has_fatal

__all__ = [
    "CropPlan", "EditPair", "EditPairDataset", "IMAGE_COLUMNS", "PairImages", "Problem",
    "SizePolicy", "VIDEO_COLUMNS", "aspect_buckets", "bucket_batches", "check_dataset", "choose_bucket",
    "clean_prompt", "format_report", "has_fatal", "load_pair", "open_image", "plan_crop", "plan_pair", "read_image",
    "read_metadata", "read_source_size", "read_video_frames", "to_rgb",
]
