"""Serving's side of the adapters, from the newest version to an engine slot.

`registry`: the version to serve each user with (follows `adapter-updates`);
`host_cache`: loaded versions in host RAM; `slots`: which version is in which engine slot;
`fallback`: serve an older version when one does not load.
"""
