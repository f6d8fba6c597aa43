/**
 * A frame link: one connection between a shipper and a receiver, carrying
 * whole frames. The shipper and the receiver only see this interface, so the
 * deterministic simulation can hand them an in-memory link with simulated
 * delays and faults, while the appliance hands them a TCP or TLS socket.
 */
import type * as net from 'node:net';
import * as tls from 'node:tls';
import { encodeFrame, FrameReader, WireProtocolError, type Frame, type FrameTypeName } from './wire.js';

export interface FrameLinkHandlers {
  frame(frame: Frame): void;
  /** Called once, when the link is gone (error undefined for an orderly close). */
  closed(error: Error | undefined): void;
}

export interface FrameLink {
  /** Queues a frame; never throws for a closed link (the frame is dropped and `closed` has fired or will). */
  send(type: FrameTypeName, payload: Buffer | readonly Buffer[]): void;
  /** Bytes queued by `send` that the transport has not taken yet. */
  readonly bufferedBytes: number;
  /** The verified peer name (TLS certificate CN), when the transport knows it. */
  readonly peerName: string | undefined;
  readonly description: string;
  start(handlers: FrameLinkHandlers): void;
  /** Ends the link; `closed` fires. */
  close(error?: Error): void;
}

/** Opens a new link to the peer (the shipper's side). */
export type LinkConnector = () => Promise<FrameLink>;

export class SocketFrameLink implements FrameLink {
  private readonly reader = new FrameReader();
  private handlers: FrameLinkHandlers | undefined;
  private ended = false;
  private closedError: Error | undefined;

  constructor(private readonly socket: net.Socket, readonly description: string) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      if (this.ended) return;
      let frames: Frame[];
      try {
        frames = this.reader.push(chunk);
      } catch (error) {
        this.close(error instanceof Error ? error : new WireProtocolError(String(error)));
        return;
      }
      for (const frame of frames) {
        if (this.ended) return;
        this.handlers?.frame(frame);
      }
    });
    socket.on('error', (error) => this.finish(error));
    socket.on('close', () => this.finish(undefined));
    socket.on('end', () => {
      // The peer closed its side: nothing more will arrive, and what we send would be lost.
      socket.end();
    });
    socket.pause();
  }

  get bufferedBytes(): number {
    return this.socket.writableLength;
  }

  get peerName(): string | undefined {
    if (!(this.socket instanceof tls.TLSSocket) || !this.socket.authorized) return undefined;
    const subject = this.socket.getPeerCertificate().subject as { CN?: string | string[] } | undefined;
    const name = subject?.CN;
    return Array.isArray(name) ? name[0] : name;
  }

  start(handlers: FrameLinkHandlers): void {
    this.handlers = handlers;
    if (this.ended) {
      queueMicrotask(() => handlers.closed(this.closedError));
      return;
    }
    this.socket.resume();
  }

  send(type: FrameTypeName, payload: Buffer | readonly Buffer[]): void {
    if (this.ended) return;
    const chunks = encodeFrame(type, payload);
    // cork/uncork turns the chunks into one vectored write.
    this.socket.cork();
    for (const chunk of chunks) this.socket.write(chunk);
    process.nextTick(() => this.socket.uncork());
  }

  close(error?: Error): void {
    if (this.ended) return;
    if (error) {
      this.finish(error);
      this.socket.destroy();
    } else {
      this.socket.end();
      // An orderly end that the peer never completes must not hold the socket forever.
      setTimeout(() => this.socket.destroy(), closeLingerMsMax).unref();
    }
  }

  private finish(error: Error | undefined): void {
    if (this.ended) {
      return;
    }
    this.ended = true;
    this.closedError = error;
    const handlers = this.handlers;
    if (handlers) handlers.closed(error);
  }
}

/** How long an orderly close may wait for the peer before the socket is destroyed. */
export const closeLingerMsMax = 5_000;
