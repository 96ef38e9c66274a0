//! HTTP health endpoints with kube-proxy's semantics.

pub mod proxy;
pub mod service_checks;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Listens on `addr`. `0.0.0.0` means every address of both families, as kube-proxy's Go listener on
/// `0.0.0.0` takes IPv6 too: one `[::]` socket that also accepts IPv4 (as v4-mapped addresses), so load
/// balancers probing a node's IPv6 address get an answer. Where IPv6 is off, IPv4 alone.
///
/// # Errors
/// When the address cannot be bound (in use, not this node's).
pub async fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        && let Ok(listener) = dual_stack(SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())))
    {
        return Ok(listener);
    }
    tokio::net::TcpListener::bind(addr).await
}

fn dual_stack(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    // Whatever `net.ipv6.bindv6only` says.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    /// `0.0.0.0` answers on both families (over loopback).
    #[tokio::test]
    async fn the_unspecified_address_listens_on_both_families() {
        let listener = super::listen("0.0.0.0:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for client in ["127.0.0.1", "::1"] {
            let target = std::net::SocketAddr::new(client.parse().unwrap(), port);
            let (connected, accepted) = tokio::join!(tokio::net::TcpStream::connect(target), listener.accept());
            connected.unwrap_or_else(|e| panic!("{target}: {e}"));
            accepted.unwrap();
        }
    }
}
