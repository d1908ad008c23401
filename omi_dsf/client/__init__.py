"""The `omi` client of a DIC: find AI services, submit, follow and fetch inference requests."""
