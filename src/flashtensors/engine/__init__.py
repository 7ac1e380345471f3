"""The load engine: plan (headers -> one arena per device) -> read (a path per file) -> place (views)."""
