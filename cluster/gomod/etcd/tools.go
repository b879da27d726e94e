//go:build tools

// Package tools only records, for `go mod tidy`, that this module builds the
// etcd server command (go.etcd.io/etcd/server/v3 is package main). It is never
// compiled.
package tools

import _ "go.etcd.io/etcd/server/v3"
