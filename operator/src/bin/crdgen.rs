//! Prints the QueueProcessor CustomResourceDefinition as YAML:
//!
//! ```text
//! cargo run -p qp-operator --bin crdgen > crds/queueprocessor.yaml
//! ```

fn main() {
    print!("{}", qp_operator::crd::crd_yaml());
}
