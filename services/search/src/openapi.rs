//! The OpenAPI 3.0 document of the search API, served at `/openapi.json`.
//! Written by hand next to the handlers it describes (api.rs); the API test
//! fuzzes the service against it with schemathesis.

use serde_json::{json, Value};

use crate::api::Limits;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn id_schema(limits: &Limits) -> Value {
    json!({ "type": "string", "minLength": 1, "maxLength": limits.max_id_chars })
}

pub fn document(limits: &Limits) -> Value {
    let id = id_schema(limits);
    let query = json!({ "type": "string", "minLength": 1, "maxLength": limits.max_query_chars });
    let accepted = json!({
        "description": "the event was acknowledged by the event broker",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Accepted" } } }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Kalon search",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Text-to-image search over the catalog, with canary routing between model versions; every answer is logged as a search.impression.v1 event."
        },
        "paths": {
            "/v1/search": {
                "post": {
                    "operationId": "search",
                    "summary": "The k images that best match a query",
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SearchRequest" } } }
                    },
                    "responses": {
                        "200": {
                            "description": "results, best first, with the model version and variant that served them",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SearchResponse" } } }
                        },
                        "400": error_response("the request breaks a limit (empty or long query, k, ids)"),
                        "404": error_response("the pinned model_version is not loaded here (the message lists those served)"),
                        "413": error_response("the body is larger than allowed"),
                        "415": error_response("the body is not JSON"),
                        "422": error_response("the JSON does not have the request's shape, or the query has no readable words"),
                        "500": error_response("the version's encoder or index failed"),
                        "503": error_response("no model version is deployed")
                    }
                }
            },
            "/v1/images/{id}": {
                "get": {
                    "operationId": "image",
                    "summary": "An image file of the catalog",
                    "parameters": [{
                        "name": "id", "in": "path", "required": true,
                        "schema": { "type": "string", "minLength": 1, "maxLength": limits.max_id_chars, "pattern": "^[A-Za-z0-9_-]+$" }
                    }],
                    "responses": {
                        "200": { "description": "the PNG file", "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } },
                        "400": error_response("not a valid image id"),
                        "404": error_response("no such image")
                    }
                }
            },
            "/v1/feedback/click": {
                "post": {
                    "operationId": "click",
                    "summary": "A click on a result (for clients that cannot produce to Kafka)",
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ClickRequest" } } }
                    },
                    "responses": {
                        "202": accepted.clone(),
                        "400": error_response("an id or a field breaks the event's schema"),
                        "413": error_response("the body is larger than allowed"),
                        "415": error_response("the body is not JSON"),
                        "422": error_response("the JSON does not have the request's shape"),
                        "503": error_response("the event broker did not acknowledge the event")
                    }
                }
            },
            "/v1/feedback/rating": {
                "post": {
                    "operationId": "rating",
                    "summary": "A 1-5 star rating of a result's relevance or beauty",
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/RatingRequest" } } }
                    },
                    "responses": {
                        "202": accepted,
                        "400": error_response("an id or a field breaks the event's schema"),
                        "413": error_response("the body is larger than allowed"),
                        "415": error_response("the body is not JSON"),
                        "422": error_response("the JSON does not have the request's shape"),
                        "503": error_response("the event broker did not acknowledge the event")
                    }
                }
            },
            "/v1/stats": {
                "get": {
                    "operationId": "stats",
                    "summary": "Per-model-version serving figures since the process started",
                    "description": "Counters of the searches routed (or pinned) to each version: answered requests, server errors, interleaved pages, impressions dropped, and the latency of the successful ones in fixed buckets. Every loaded version appears.",
                    "responses": {
                        "200": {
                            "description": "the figures, by version name",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ServingStats" } } }
                        }
                    }
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": { "200": { "description": "the OpenAPI document", "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness: the process answers",
                    "responses": { "200": { "description": "alive", "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: a model version with traffic weight is loaded",
                    "responses": {
                        "200": { "description": "ready; the variants in service", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "503": { "description": "not ready: nothing is deployed", "content": { "application/json": { "schema": { "type": "object" } } } }
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": { "error": { "type": "string" } }
                },
                "Accepted": {
                    "type": "object", "required": ["event_id"],
                    "properties": { "event_id": { "type": "string", "format": "uuid" } }
                },
                "SearchRequest": {
                    "type": "object", "required": ["query"], "additionalProperties": false,
                    "properties": {
                        "query": query.clone(),
                        "k": { "type": "integer", "minimum": 1, "maximum": limits.max_k, "default": 10 },
                        "session_id": id.clone(),
                        "user_id": id.clone(),
                        "model_version": {
                            "type": "string", "minLength": 1, "maxLength": limits.max_id_chars,
                            "description": "pin the search to this loaded version (any weight): an evaluation, so no impression is logged and the page is neither interleaved nor explored"
                        }
                    }
                },
                "SearchHit": {
                    "type": "object", "required": ["image_id", "rank", "score", "url"],
                    "properties": {
                        "image_id": { "type": "string" },
                        "rank": { "type": "integer", "minimum": 1 },
                        "score": { "type": "number", "description": "the score of the version that ranked it (on an interleaved page, of the team that drafted it)" },
                        "url": { "type": "string" },
                        "team": {
                            "type": "string", "enum": ["stable", "candidate"],
                            "description": "only on a team-draft interleaved page: the ranking that drafted this hit"
                        }
                    }
                },
                "SearchResponse": {
                    "type": "object", "required": ["request_id", "model_version", "variant", "results"],
                    "properties": {
                        "request_id": { "type": "string" },
                        "model_version": { "type": "string" },
                        "variant": { "type": "string" },
                        "results": { "type": "array", "items": { "$ref": "#/components/schemas/SearchHit" } }
                    }
                },
                "ServingStats": {
                    "type": "object", "required": ["started_at", "versions"],
                    "properties": {
                        "started_at": { "type": "string", "format": "date-time" },
                        "versions": { "type": "array", "items": { "$ref": "#/components/schemas/VersionStats" } }
                    }
                },
                "VersionStats": {
                    "type": "object",
                    "required": ["model_version", "requests", "errors", "interleaved", "impressions_dropped", "latency_ms_buckets", "latency_counts"],
                    "properties": {
                        "model_version": { "type": "string" },
                        "requests": { "type": "integer", "minimum": 0, "description": "searches routed or pinned to it and answered, any status" },
                        "errors": { "type": "integer", "minimum": 0, "description": "of those, answered with a server error" },
                        "interleaved": { "type": "integer", "minimum": 0, "description": "successful searches answered with an interleaved page" },
                        "impressions_dropped": { "type": "integer", "minimum": 0 },
                        "latency_ms_buckets": {
                            "type": "array", "items": { "type": "integer", "nullable": true },
                            "description": "inclusive upper bounds in milliseconds; the last is null (no bound)"
                        },
                        "latency_counts": {
                            "type": "array", "items": { "type": "integer", "minimum": 0 },
                            "description": "successful searches per bucket (not cumulative)"
                        }
                    }
                },
                "ClickRequest": {
                    "type": "object", "required": ["request_id", "image_id", "rank"], "additionalProperties": false,
                    "properties": {
                        "request_id": id.clone(),
                        "image_id": id.clone(),
                        "rank": { "type": "integer", "minimum": 1, "maximum": 4294967295u64 },
                        "dwell_ms": { "type": "integer", "minimum": 0 }
                    }
                },
                "RatingRequest": {
                    "type": "object", "required": ["query", "image_id", "stars", "aspect"], "additionalProperties": false,
                    "properties": {
                        "request_id": id.clone(),
                        "query": query,
                        "image_id": id,
                        "stars": { "type": "integer", "minimum": 1, "maximum": 5 },
                        "aspect": { "type": "string", "enum": ["aesthetic", "relevance"] }
                    }
                }
            }
        }
    })
}
