//! The manifests in deploy/: well-formed, and covering what the mesh reads.

#[test]
fn every_security_kind_the_mesh_reads_has_a_crd_serving_v1_and_v1beta1() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml"))
        .unwrap();
    let crds: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
    ] {
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap();
        assert_eq!(
            crd["metadata"]["name"].as_str(),
            Some(format!("{plural}.security.istio.io").as_str())
        );
        assert_eq!(crd["spec"]["group"].as_str(), Some("security.istio.io"));
        let versions: Vec<&str> = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(versions, vec!["v1", "v1beta1"], "{kind}");
        let storage = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| v["storage"] == true)
            .count();
        assert_eq!(storage, 1, "{kind}: exactly one storage version");
    }
}
