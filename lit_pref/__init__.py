"""lit_pref."""
