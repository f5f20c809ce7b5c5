"""The long-lived actors of async-pmd, one per file, each thin over `async_pmd/`."""
