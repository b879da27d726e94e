//! Where the agents are: the EndpointSlices of the agent Service map node names to addresses.
//! In a cluster the DaemonSet's pods populate them; the local test cluster writes them by hand.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;

/// Name of the Service port of the agent API.
pub const API_PORT_NAME: &str = "api";

/// The base URL of the agent on `node`, from the watched EndpointSlices. With
/// `address_override`, that host is dialled instead of the endpoint's address (the port and
/// the node mapping still come from the slice): for setups where agents are reached through
/// a local address that EndpointSlices may not hold, such as loopback in the local cluster.
pub fn endpoint_for(slices: &Store<EndpointSlice>, node: &str, address_override: Option<&str>) -> Option<String> {
    slices
        .state()
        .iter()
        .find_map(|slice| base_url_with(slice, node, address_override))
}

pub fn base_url(slice: &EndpointSlice, node: &str) -> Option<String> {
    base_url_with(slice, node, None)
}

fn base_url_with(slice: &EndpointSlice, node: &str, address_override: Option<&str>) -> Option<String> {
    let port = slice
        .ports
        .as_ref()?
        .iter()
        .find(|p| p.name.as_deref() == Some(API_PORT_NAME))?
        .port?;
    let endpoint = slice.endpoints.iter().find(|e| {
        e.node_name.as_deref() == Some(node) && e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
    })?;
    let address = match address_override {
        Some(a) => a.to_string(),
        None => endpoint.addresses.first()?.clone(),
    };
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.clone()
    };
    Some(format!("https://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ready_endpoint_of_node() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "addressType": "IPv4",
            "metadata": {"name": "agents-a"},
            "ports": [{"name": "api", "port": 9443}, {"name": "registry", "port": 5443}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "node-a", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "nodeName": "node-b", "conditions": {"ready": false}}
            ]
        }))
        .unwrap();
        assert_eq!(base_url(&slice, "node-a").as_deref(), Some("https://10.0.0.1:9443"));
        assert_eq!(base_url(&slice, "node-b"), None, "not ready");
        assert_eq!(base_url(&slice, "node-c"), None);
        assert_eq!(
            base_url_with(&slice, "node-a", Some("127.0.0.1")).as_deref(),
            Some("https://127.0.0.1:9443")
        );
    }
}
