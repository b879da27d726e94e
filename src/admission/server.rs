//! HTTP glue of the webhooks (filled in below).
