"""The API's documented shapes: response models and the multipart form, for ``/openapi.json``.

The report route parses its multipart body itself (see :mod:`ifnet.serve.upload`), so the form is
described here by hand; the responses are built as dicts and documented by these models.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from ifnet.labels import OBSERVATIONS


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


class ViewInfo(BaseModel):
    field: Literal["frontal", "lateral"]
    filename: Optional[str]
    format: Literal["png", "jpeg", "dicom"]
    width: int
    height: int
    dtype: Literal["uint8", "uint16"]


class ModelInfo(BaseModel):
    checkpoint: str
    runtime: str = Field(description="pytorch, or onnxruntime-fp32 / onnxruntime-int8 for an `ifnet export` folder")
    extractor: str
    max_views: int
    image_size: int
    iec: str = Field(description="image enhancement the checkpoint was trained with (none, clahe, adaptive)")
    beam_size: int
    max_len: int
    guidance: float = Field(description="condition guidance weight of the decoding (0: plain beam search)")
    mbr_samples: int = Field(0, description="samples of findings-preserving minimum Bayes-risk decoding "
                                            "(0: the beam's best report)")
    device: str
    version: str


class ViewImages(BaseModel):
    original: str = Field(description="PNG data URL, long side at most the server's display size")
    enhanced: str


class Images(BaseModel):
    frontal: ViewImages
    lateral: Optional[ViewImages] = None
    heatmap: Optional[str] = Field(None, description="PNG data URL: the heatmap over the frontal view")


class Consistency(BaseModel):
    said: list[str] = Field(description="findings the report asserts (the project's labeler on the generated text)")
    unsupported: list[str] = Field(description="findings the report asserts that are not in its condition")
    unsaid: list[str] = Field(description="findings of the condition the report does not say")


class ReportResponse(BaseModel):
    report: str
    findings: dict[str, float] = Field(description="the 14 CheXpert observations -> probability")
    condition: dict[str, float] = Field(description="the label vector the memory was conditioned on")
    conditioned_on: Literal["predicted", "supplied"]
    consistency: Consistency = Field(description="the report against its condition (ifnet.metrics.consistency)")
    heatmap_label: Optional[str]
    timings_ms: dict[str, float] = Field(
        description="model stages (enhance, preprocess, backbone, memory_encoder, decode, consistency, heatmap, total) "
                    "and server stages (upload, queue_wait, image_decode, render_images, request)")
    views: list[ViewInfo]
    warnings: list[str]
    model: ModelInfo
    images: Optional[Images] = None


class QueueInfo(BaseModel):
    workers: int
    queue_size: int
    running: int
    waiting: int
    completed: int
    rejected: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queue: QueueInfo


class LimitsInfo(BaseModel):
    max_upload_bytes: int
    workers: int
    queue_size: int


class ModelResponse(ModelInfo):
    observations: list[str]
    limits: LimitsInfo


REPORT_FORM = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["frontal"],
        "properties": {
            "frontal": {"type": "string", "format": "binary",
                        "description": "frontal (PA/AP) view: PNG, JPEG or DICOM, recognised by content"},
            "lateral": {"type": "string", "format": "binary", "description": "optional lateral view"},
            "findings": {"type": "string", "example": "Cardiomegaly, Pleural Effusion",
                         "description": "optional: condition the report on these observations (comma-separated) "
                                        "instead of the model's predictions; names: " + ", ".join(OBSERVATIONS)},
            "heatmap": {"type": "boolean", "default": False,
                        "description": "also compute the activation map of the most probable finding"},
        },
    }}},
}
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "a bad field or a corrupt image (the message gives the decoder's reason)"),
    (408, "the whole upload did not arrive within the server's upload timeout"),
    (413, "the upload is larger than the server's limit"),
    (415, "not multipart/form-data, or a file that is not PNG, JPEG or DICOM"),
    (422, "a malformed query parameter"),
    (503, "every worker is busy and the queue is full; retry after the Retry-After header's seconds"),
)}
