"""De-identification (PS3.15 Annex E), pseudonym providers, leak check and re-identification.

Entry points: `pipeline.StudyPseudonymizer` (stream a study), `leakcheck.check_outgoing`,
`reidentify.Reidentifier`, `pseudonyms.make_provider` and
the `deid` command (`cli.py`). See docs/pseudonymization.md.
"""
