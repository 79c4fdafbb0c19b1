//! What the holder's unit tests share.

/// A one-mesh VirtualMesh with a builtin 2048-bit root under shared trust; `STATE` stands for
/// the state folder. Tests append holder settings to it.
pub const VIRTUAL_MESH: &str = r#"
apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: vm
spec:
  meshes:
    - name: mesh-a
      trustDomain: mesh-a.test
  certificateAuthority:
    builtin:
      rsaKeySizeBytes: 2048
  shared: {}
holder:
  listen: 127.0.0.1:0
  stateDir: STATE
"#;
