"""The test and demo harness: what tests, the demo (`omi_dsf/demo.py`) and the benchmarks
(`tools/bench/`) build their worlds from. Product modules never import it (tests/test_layers.py).

  phantom      synthetic chest CT study (fake identity) with known lungs, `sample-study`
  synthetic    synthetic datasets with realistic fake identities in every hiding place
  legacy_pacs  a real legacy PACS on loopback: dcmtk dcmqrscp, Orthanc (with an LD_PRELOAD
               loopback-bind shim compiled on first use)
  gateway      the DICOMweb gateway as a child process (`gateway --config`), up once /health answers
  ai_service   the reference AI service as a child process, up once its model is ready
  procs        a free port; stopping a child process (ask, then insist)
  sites        worker site configurations for the sites of a running test bed
"""
