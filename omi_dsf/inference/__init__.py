"""Inference: Open Inference Protocol v2 client, reference AI service, result objects.

  tensors   OIP v2 tensors on the wire: JSON and the binary tensor data extension
  client    OIP v2 client (health, metadata, infer) with clear errors
  lungseg   the reference model: classical lung segmentation, no learned weights
  service   the reference AI service (starlette/uvicorn), `ai-service`
  volume    study instances → one checked CT volume
  results   DICOM SEG, DICOM SR TID 1500, FHIR R4 (MII imaging module)
  transfer  WADO-RS of a series and STOW-RS of results at the provider's gateway
The `infer` step is omi_dsf/steps/infer.py; the synthetic CT study the tests and the demo use is
omi_dsf/testkit/phantom.py.
"""
